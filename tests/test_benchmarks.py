"""Benchmarks: no TensorFlow on the import path, and the FLOP model against REFERENCE.md's figures."""

import subprocess
import sys

import pytest

from conftest import ROOT


def test_benchmarks_import_no_tensorflow_or_clu():
    code = ("import sys; import benchmarks.train_step, benchmarks.masking_speedup, benchmarks.attention, "
            "benchmarks.matmuls; "
            "bad = [m for m in ('tensorflow', 'clu', 'tensorflow_datasets') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


@pytest.mark.parametrize("size,ratio,visible,expected,tol", [
    ("vit_b", 0.9, 156, 0.28, 0.05),   # REFERENCE.md counts the patch embed on all 1568 patches;
    ("vit_l", 0.9, 156, 0.49, 0.05),   # we embed only the visible ones, hence a few % lower
    ("vit_h", 0.9, 156, 0.81, 0.05),
    ("vit_l", 0.0, 1568, 3.77, 0.01),
])
def test_train_flops_match_reference_table(size, ratio, visible, expected, tol):
    from benchmarks import common
    c = common.make_config(size, 16, 224, 1, ratio if ratio > 0 else 0.5, "float32")
    tflop = common.train_flops_per_clip(c.model, visible) / 1e12
    assert tflop == pytest.approx(expected, rel=tol)
    assert tflop <= expected * 1.001  # never more than the reference's count


def test_overrides_set_fields_and_validate():
    from benchmarks import common
    from mae_st_jax import config_lib
    c = common.make_config("vit_s", 4, 64, 8, 0.5, "float32")  # 8 fake devices (conftest)
    common.apply_overrides(c, ["model.scan_layers=True", "model.remat=dots", "optim.clip_grad=0.5"])
    assert c.model.scan_layers is True and c.model.remat == "dots" and c.optim.clip_grad == 0.5
    with pytest.raises(SystemExit, match="no field 'model.bogus'"):
        common.apply_overrides(c, ["model.bogus=1"])
    with pytest.raises(SystemExit, match="model.scan_layers"):  # wrong type: one line, not a traceback
        common.apply_overrides(c, ["model.scan_layers=yes"])
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        common.apply_overrides(c, ["model.remat"])
    with pytest.raises(config_lib.ConfigError, match="remat"):
        common.apply_overrides(c, ["model.remat=sometimes"])


def test_cpu_description_names_model_isa_and_cores(tmp_path):
    from benchmarks import common
    intel, amd, empty = tmp_path / "intel", tmp_path / "amd", tmp_path / "empty"
    intel.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: fpu sse avx avx2 fma "
                     "avx512f avx512bw\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    amd.write_text("cpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx avx2 fma\n")
    empty.write_text("")
    a, b, c = (common.cpu_description(str(p)) for p in (intel, amd, empty))
    assert (a["model"], a["isa"]) == ("Intel(R) Xeon(R) Platinum", "avx512f")  # the first processor's
    assert (b["model"], b["isa"]) == ("AMD EPYC 7B13 (family 25, model 1)", "avx2")
    assert (c["model"], c["isa"]) == ("unknown", "unknown")
    assert common.cpu_description(str(tmp_path / "missing"))["model"] == "unknown"
    assert a["cores"] >= 1 and a["cores"] == b["cores"]


def test_gpu_sweep_script_runs_variants_and_tabulates(tmp_path):
    # the script the H100 numbers in the README came from, run on CPU with a tiny clip: each variant
    # is one JSON line, an env word reaches the process, PROFILE brings back a trace and the HLO
    import gzip
    import json
    import os
    from conftest import ROOT
    tiny = "--size=vit_s --frames=4 --img=64 --mask_ratio=0.5 --dtype=float32 --batch=2 --steps=1 --repeats=1"
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "VARIANT_TIMEOUT": "300"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a bare box
    r = subprocess.run(["bash", "benchmarks/gpu_sweep.sh", tiny, f"MAE_ST_HOST_MALLOC=0 {tiny} PROFILE",
                        "--size=vit_bogus"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [row["variant"] for row in rows] == [tiny, f"MAE_ST_HOST_MALLOC=0 {tiny} PROFILE"], r.stdout + r.stderr
    assert rows[0]["host_malloc"] and not rows[1]["host_malloc"]  # the env word reached the run
    assert all(row["median_step_s"] > 0 and row["size"] == "vit_s" and row["batch"] == 2 for row in rows)
    assert (tmp_path / "prof_2.xplane.pb").stat().st_size > 0
    assert "HloModule" in gzip.open(tmp_path / "hlo_2.txt.gz", "rt").read(10000)
    assert "failed" in r.stdout and "vit_bogus" in (tmp_path / "errors.log").read_text()
    assert r.stdout.rstrip().splitlines()[-1].endswith(f"{tiny} PROFILE")  # the table comes last


def test_attention_benchmark_checks_pallas_padding_on_cpu():
    # benchmarks/attention.py pads for Pallas' block size and masks the padding with segment ids;
    # in interpret mode on CPU its values and gradients must match XLA's attention (the script
    # reports the relative errors), and cuDNN, absent here, is reported as an error row, not a crash
    import json
    from conftest import ROOT
    r = subprocess.run([sys.executable, "benchmarks/attention.py", "--batch=1", "--iters=1", "--dtype=float32",
                        "--shapes=tiny:37:2:32", "--interpret", "--only=xla,pallas_64x64_bwd32,cudnn_pad16"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["impl"]: row for row in (json.loads(line) for line in r.stdout.splitlines() if line.startswith("{"))}
    assert set(rows) == {"xla", "pallas_64x64_bwd32", "cudnn_pad16"}
    assert len(rows["pallas_64x64_bwd32"]["rel_err"]) == 4  # value, dq, dk, dv
    assert max(rows["pallas_64x64_bwd32"]["rel_err"]) < 1e-5
    assert max(rows["xla"]["rel_err"]) == 0.0
    assert "error" in rows["cudnn_pad16"]


FAKE_MODELS_MAE = '''
import torch


class TinyMAE(torch.nn.Module):
    """Stands in for the reference's MaskedAutoencoderViT: same constructor keywords, same call."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self.proj = torch.nn.Linear(3, 4)
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, imgs, mask_ratio=0.9):
        x = imgs.mean(dim=(2, 3, 4))  # [N, 3]
        loss = self.norm(self.proj(x)).pow(2).mean()
        return loss, None, None


def mae_vit_base_patch16(**kwargs):
    return TinyMAE(**kwargs)
'''

FAKE_LR_SCHED = '''
def adjust_learning_rate(optimizer, epoch, args):
    for group in optimizer.param_groups:
        group["lr"] = args.lr
    return args.lr
'''


def _fake_reference(tmp_path):
    """(a stand-in mae_st checkout, an environment without XLA/malloc settings) for compare_torch."""
    import os
    ref = tmp_path / "mae_st"
    (ref / "util").mkdir(parents=True)
    (ref / "models_mae.py").write_text(FAKE_MODELS_MAE)
    (ref / "util" / "lr_sched.py").write_text(FAKE_LR_SCHED)
    return ref, {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",) and not k.startswith("MALLOC_")}


def test_compare_torch_runs_both_sides_and_reports_the_ratio(tmp_path):
    # the criterion's tool end to end, with a stand-in for the reference checkout (the real one is
    # fetched outside the repo): every variant runs, in the given order, with its environment, and the
    # JSON's medians, ratio (ours/reference, whichever ran first) and pass/fail follow from its runs
    import json
    ref, env = _fake_reference(tmp_path)
    r = subprocess.run([sys.executable, "benchmarks/compare_torch.py", f"--ref_dir={ref}", "--size=vit_b",
                        "--frames=4", "--img=32", "--batch=2", "--mask_ratio=0.5", "--steps=1", "--repeats=1",
                        "--rounds=1", "--threads=1", "--target=1e9",
                        "--variants=reference,ours,reference_malloc"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    order = [line.split()[2] for line in r.stderr.splitlines() if line.startswith("round 0 ")]
    assert order == ["reference", "ours", "reference_malloc"]
    med = out["median_clips_per_s"]
    assert set(med) == {"ours", "reference", "reference_malloc"} and all(v > 0 for v in med.values())
    for name, runs in out["runs"].items():
        assert len(runs) == 1 and runs[0]["clips_per_s"] == med[name]
    assert out["ratio"] == {"of": "ours/reference", "value": pytest.approx(med["ours"] / med["reference"]),
                            "statistic": "ratio of median clips/s"}
    assert out["paired"] is None
    assert out["ratios"] == {"ours/reference": pytest.approx(med["ours"] / med["reference"]),
                             "ours/reference_malloc": pytest.approx(med["ours"] / med["reference_malloc"])}
    assert out["meets_target"] is False  # target 1e9
    assert out["commands"]["reference_malloc"].startswith("MALLOC_ARENA_MAX=1 ")
    assert "MALLOC_" not in out["commands"]["reference"]
    assert out["host_cpu"]["cores"] >= 1 and out["host_cpu"]["model"]
    assert set(out["torch_build"]) == {"cpu_capability", "mkl", "mkldnn"}
    # a reference folder without models_mae.py is a one-line exit, not a traceback
    bad = subprocess.run([sys.executable, "benchmarks/compare_torch.py", f"--ref_dir={tmp_path}", "--rounds=1",
                          "--variants=reference,reference_malloc"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "has no models_mae.py" in bad.stderr


def test_compare_torch_paired_times_live_workers_in_turn(tmp_path):
    # --paired: one long-lived process per variant, asked in turn; the ratio is the median of the
    # per-round ratios of timings taken seconds apart, and each round's ratio is ours/reference of
    # that round's two timings
    import json
    import statistics
    ref, env = _fake_reference(tmp_path)
    r = subprocess.run([sys.executable, "benchmarks/compare_torch.py", f"--ref_dir={ref}", "--size=vit_b",
                        "--frames=4", "--img=32", "--batch=2", "--mask_ratio=0.5", "--steps=2", "--rounds=3",
                        "--threads=1", "--paired", "--gap=0", "--variants=reference,ours"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    turns = [line.split()[1:3] for line in r.stderr.splitlines() if line.startswith("round ")]
    assert turns == [["0", "reference"], ["0", "ours"], ["1", "ours"], ["1", "reference"],
                     ["2", "reference"], ["2", "ours"]]
    runs = out["runs"]
    assert [x["round"] for x in runs["ours"]] == [0, 1, 2] == [x["round"] for x in runs["reference"]]
    per_round = [o["clips_per_s"] / t["clips_per_s"] for o, t in zip(runs["ours"], runs["reference"])]
    assert out["paired"]["per_round"] == pytest.approx(per_round)
    assert out["ratio"]["value"] == pytest.approx(statistics.median(per_round))
    assert out["ratio"]["statistic"] == "median of per-round ratios"
    q1, q3 = out["paired"]["quartiles"]
    assert min(per_round) <= q1 <= out["ratio"]["value"] <= q3 <= max(per_round)
    med = out["median_clips_per_s"]
    assert out["paired"]["ratio_of_medians"] == pytest.approx(med["ours"] / med["reference"])
    for name, turns_of in runs.items():  # each turn timed 2 steps in a process that stayed alive
        assert all(x["clips_per_s"] == pytest.approx(2 / x["median_step_s"]) for x in turns_of)
    assert out["host_cpu"]["cores"] >= 1 and set(out["torch_build"]) == {"cpu_capability", "mkl", "mkldnn"}
    # a worker that dies before it is ready is a one-line exit naming it
    bad = subprocess.run([sys.executable, "benchmarks/compare_torch.py", f"--ref_dir={tmp_path}", "--rounds=1",
                          "--paired", "--variants=ours,reference"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "reference worker: exited" in bad.stderr.splitlines()[-1]


def test_paired_serve_answers_each_request_then_stops():
    import io
    import json
    from benchmarks import paired
    calls = []

    def time_steps(n):
        calls.append(n)
        return {"step_s": 0.5 * n}

    out = io.StringIO()
    assert paired.serve(time_steps, {"who": "x"}, stdin=io.StringIO("3\n1\n\n7\n"), stdout=out) == 2
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines == [{"ready": True, "who": "x"}, {"step_s": 1.5}, {"step_s": 0.5}]
    assert calls == [3, 1]  # the empty line ended it: 7 was never run
    with pytest.raises(ValueError, match="positive integer"):
        paired.serve(time_steps, {}, stdin=io.StringIO("0\n"), stdout=io.StringIO())


def test_matmuls_benchmark_covers_the_steps_linear_layers():
    # every linear layer of the step, at the step's row counts, both libraries, and totals that are
    # the counted sums of what it lists
    import json
    import os
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a bare box
    r = subprocess.run([sys.executable, "benchmarks/matmuls.py", "--size=vit_s", "--frames=4", "--img=64",
                        "--batch=2", "--mask_ratio=0.5", "--iters=1", "--torch", "--threads=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    from benchmarks import common
    m = common.make_config("vit_s", 4, 64, 2, 0.5, "float32").model
    visible, grid = out["visible_tokens"], 2 * 4 * 4
    assert visible == 16
    by_name = {s["name"]: s for s in out["shapes"]}
    assert by_name["encoder fc1"]["count"] == m.depth and by_name["encoder fc1"]["rows"] == 2 * (visible + 1)
    assert (by_name["encoder fc1"]["k"], by_name["encoder fc1"]["n"]) == (m.embed_dim, 4 * m.embed_dim)
    assert by_name["decoder q/k/v/proj"]["count"] == 4 * m.decoder_depth
    assert by_name["decoder fc2"]["rows"] == 2 * (grid + 1)
    assert by_name["patch_embed"]["k"] == 2 * 16 * 16 * 3 and by_name["patch_embed"]["rows"] == 2 * visible
    for side in ("jax", "torch"):
        total = sum(s["count"] * sum(s[f"{side}_ms"].values()) for s in out["shapes"])
        assert out["step_total_ms"][side] == pytest.approx(total) and total > 0
    # per clip they are the FLOP model's multiply-adds less attention's, plus the prediction head on
    # the decoder's cls token, which the model (as the reference) computes and drops
    macs = sum(s["count"] * s["rows"] * s["k"] * s["n"] for s in out["shapes"]) / 2
    attention = m.depth * 2 * (visible + 1) ** 2 * m.embed_dim + m.decoder_depth * 2 * (grid + 1) ** 2 * \
        m.decoder_embed_dim
    pred_on_cls = m.decoder_embed_dim * by_name["decoder_pred"]["n"]
    assert 6 * (macs + attention - pred_on_cls) == pytest.approx(common.train_flops_per_clip(m, visible), rel=1e-9)
