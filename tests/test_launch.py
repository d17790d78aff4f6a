"""Launch scripts: launch/sweep.py (commands, flag round trip, validation, --local), launch/tpu_pod.sh and
launch/gpu_slurm.sbatch (dry runs and runs against fake gcloud / srun); no JAX compilation."""

import importlib.util
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import textwrap

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import ROOT, load_config_module

SWEEP_PY = ROOT / "launch" / "sweep.py"
TPU_POD = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "gpu_slurm.sbatch"


def _load_sweep():
    spec = importlib.util.spec_from_file_location("launch_sweep", SWEEP_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


def run_sweep(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(SWEEP_PY), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def parse_like_main(config_spec, overrides):
    """The config main.py would get: ml_collections config_flags with lock_config=True, as main.py defines it."""
    argv = ["main.py", f"--config={config_spec}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def get_field(config, dotted):
    for key in dotted.split("."):
        config = config[key]
    return config


def split_command(argv):
    """(config spec, workdir, {field: text} of --config.* overrides, other flags) of one main.py command."""
    assert argv[1:3] == ["-m", "mae_st_jax.main"], argv
    spec = workdir = None
    overrides, rest = {}, []
    for a in argv[3:]:
        if a.startswith("--config="):
            spec = a.split("=", 1)[1]
        elif a.startswith("--workdir="):
            workdir = a.split("=", 1)[1]
        elif a.startswith("--config."):
            name, value = a[len("--config."):].split("=", 1)
            overrides[name] = value
        else:
            rest.append(a)
    return spec, workdir, overrides, rest


def write_exe(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ----------------------------------------------------------------------------- sweep.py: dry run

@pytest.mark.parametrize("spec", ["configs/demo.py", "configs/finetune.py:demo"])
def test_dry_run_prints_one_command_per_point_with_its_overrides(spec, tmp_path):
    points = load_config_module(spec.split(":")[0].split("/")[1][:-3]).sweep()
    result = run_sweep(f"--config={spec}", f"--workdir={tmp_path}/sweep", "--python=/opt/py/bin/python")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(points) >= 2
    workdirs = []
    for point, line in zip(points, lines):
        argv = shlex.split(line)
        assert argv[0] == "/opt/py/bin/python"
        got_spec, workdir, overrides, rest = split_command(argv)
        assert got_spec == spec and rest == []
        assert sorted(overrides) == sorted(point)  # exactly the point's fields, nothing else
        assert workdir.startswith(f"{tmp_path}/sweep/")
        workdirs.append(workdir)
        # the printed flags, parsed as main.py parses them, give the point's values, types included
        config = parse_like_main(spec, [f"--config.{k}={v}" for k, v in overrides.items()])
        for field, want in point.items():
            got = get_field(config, field)
            assert type(got) is type(want) and got == want, (field, got, want)
    assert len(set(workdirs)) == len(workdirs)
    names = [w.rsplit("/", 1)[1] for w in workdirs]
    assert all(re.fullmatch(r"[A-Za-z0-9._=+,-]+", n) for n in names), names
    assert [n[:3] for n in names] == [f"{i:02d}_" for i in range(len(points))]


def test_default_is_dry_run_and_points_and_extra_flags(monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = sweep.build_commands("configs/finetune.py:demo", "gs://bucket/sw/", python="py",
                                    extra_flags=["--config.total_steps=3", "--num_processes=1"], points="0,2-3")
    names = [n for n, _ in commands]
    assert names == ["00_layer_decay=0.65,mixup_prob=0.0", "02_layer_decay=0.75,mixup_prob=0.0",
                     "03_layer_decay=0.75,mixup_prob=1.0"]
    for name, argv in commands:
        assert f"--workdir=gs://bucket/sw/{name}" in argv
        assert argv[-2:] == ["--config.total_steps=3", "--num_processes=1"]
    result = run_sweep("--config=configs/demo.py", "--workdir=w", "--points=1")  # neither flag: prints only
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1
    assert "model.mask_ratio=0.9" in result.stdout and not (ROOT / "w").exists()


def test_every_value_type_round_trips_through_config_flags(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.py").write_text(textwrap.dedent("""
        import ml_collections
        def get_config(arg=""):
            c = ml_collections.ConfigDict()
            c.lr = 0.1; c.steps = 3; c.on = False; c.name = "x"; c.crop = (0.5, 1.0); c.tags = ("a",)
            c.opt = ml_collections.ConfigDict(dict(eps=1e-8, kind="adam"))
            c.arg = arg
            return c
        def sweep():
            return [{"lr": 1e-05, "steps": -7, "on": True, "name": "two words/and 'quotes'", "crop": (0.25, 1),
                     "tags": ("p q", "r,s"), "opt.eps": 0.1 + 0.2},
                    {"lr": 2, "name": "", "crop": (), "tags": ("1.5",), "opt.kind": "true"},
                    {}]
    """))
    commands = sweep.build_commands("cfg.py:hello", "runs", python="py")
    points = load_module_points(tmp_path / "cfg.py")
    assert len(commands) == 3 and commands[2][0] == "02_base"
    for (name, argv), point in zip(commands, points):
        assert "/" not in name and " " not in name and "'" not in name
        # through a shell and back, as a pasted command would be
        argv = shlex.split(shlex.join(argv))
        spec, _, overrides, _ = split_command(argv)
        config = parse_like_main(spec, [f"--config.{k}={v}" for k, v in overrides.items()])
        assert config.arg == "hello"
        for field, want in point.items():
            want = float(want) if field == "lr" else want  # an int in a float field is stored as a float
            got = get_field(config, field)
            assert type(got) is type(want) and got == want, (field, got, want)
            if isinstance(want, tuple):
                assert [type(x) for x in got] == [type(x) for x in want]


def test_sweep_refuses_flags_that_do_not_parse_back(tmp_path, monkeypatch):
    """The built-in check: a flag text that config_flags reads as another value stops the sweep."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.py").write_text("import ml_collections\n"
                                     "def get_config(arg=''):\n    return ml_collections.ConfigDict(dict(lr=0.1))\n"
                                     "def sweep():\n    return [{'lr': 0.123456789}]\n")
    assert sweep.build_commands("cfg.py", "w")[0][1][-1] == "--config.lr=0.123456789"
    monkeypatch.setattr(sweep, "format_value", lambda v: "%.3g" % v)
    with pytest.raises(sweep.SweepError, match="'lr'=0.123456789 .* comes back from its flag as 0.123"):
        sweep.build_commands("cfg.py", "w")


def load_module_points(path):
    spec = importlib.util.spec_from_file_location("points_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sweep()


# ----------------------------------------------------------------------------- sweep.py: errors

def write_config(tmp_path, sweep_body, name="cfg.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent("""
        import ml_collections
        def get_config(arg=""):
            c = ml_collections.ConfigDict()
            c.steps = 3
            c.model = ml_collections.ConfigDict(dict(mask_ratio=0.9, depth=4))
            return c
    """) + sweep_body)
    return path


@pytest.mark.parametrize("body, words", [
    ("def sweep():\n    return [{'steps': 4}, {'model.mask_ratioo': 0.5}]\n", ["model.mask_ratioo", "point 1"]),
    ("def sweep():\n    return [{'nothere.x': 1}]\n", ["nothere.x"]),
    ("def sweep():\n    return [{'model.depth': 2.5}]\n", ["model.depth", "type"]),
    ("def sweep():\n    return [{'model': 2}]\n", ["model"]),
    ("def sweep():\n    return []\n", ["sweep()"]),
    ("", ["sweep()"]),  # no sweep() at all
])
def test_bad_sweeps_fail_with_one_line_before_running_anything(tmp_path, body, words):
    path = write_config(tmp_path, body)
    stub = write_exe(tmp_path / "stub", "#!/bin/sh\ntouch ran\n")
    result = run_sweep(f"--config={path}", "--workdir=w", "--local", f"--python={stub}", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stdout == "" and not (tmp_path / "ran").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sweep: "), result.stderr
    for word in words:
        assert word in lines[0]


def test_cli_errors_for_missing_file_bad_arg_points_and_extra_flags(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    cases = [
        (["--config=configs/nope.py"], "configs/nope.py"),
        (["--config=configs/finetune.py:vit_zz"], "get_config"),
        (["--config=configs/demo.py", "--points=4"], "--points=4"),
        (["--config=configs/demo.py", "--points=x"], "--points=x"),
        (["--config=configs/demo.py", "--", "--config.model.mask_ratio=0.5"], "model.mask_ratio"),
        (["--config=configs/demo.py", "--", "--workdir=elsewhere"], "--workdir"),
    ]
    for args, word in cases:
        code = sweep.main([*args[:1], "--workdir=w", *args[1:]])  # in-process: main() is what the CLI runs
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert code != 0 and out == "" and len(lines) == 1 and word in lines[0], (args, err)


# ----------------------------------------------------------------------------- sweep.py: --local

def make_stub(tmp_path, fail_when=None):
    """A stand-in python: appends its argv to calls.jsonl; exits 1 when fail_when is in its workdir flag."""
    record = tmp_path / "calls.jsonl"
    stub = write_exe(tmp_path / "fake_python", f"""
        #!{sys.executable}
        import json, sys
        with open({str(record)!r}, "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        sys.exit(1 if {fail_when!r} and any({fail_when!r} in a for a in sys.argv if a.startswith("--workdir=")) else 0)
    """)
    return stub, record


def read_calls(record):
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def test_local_runs_every_point_with_its_own_workdir(tmp_path):
    stub, record = make_stub(tmp_path)
    points = load_config_module("demo").sweep()
    result = run_sweep("--config=configs/demo.py", f"--workdir={tmp_path}/runs", "--local", f"--python={stub}",
                       "--", "--config.total_steps=2")
    assert result.returncode == 0, result.stderr
    calls = read_calls(record)
    assert len(calls) == len(points)
    workdirs = [a for call in calls for a in call if a.startswith("--workdir=")]
    assert len(set(workdirs)) == len(points)
    for call, point in zip(calls, points):
        _, _, overrides, rest = split_command(["py", *call])
        assert sorted(overrides) == sorted([*point, "total_steps"]) and rest == []
        assert call[-1] == "--config.total_steps=2"  # the extra flag comes last
    assert f"{len(points)} of {len(points)} points succeeded" in result.stderr


def test_local_stops_at_first_failure_unless_keep_going(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    stub, record = make_stub(tmp_path, fail_when="/01_")
    points = load_config_module("demo").sweep()
    args = ["--config=configs/demo.py", f"--workdir={tmp_path}/runs", "--local", f"--python={stub}"]
    assert sweep.main(args) != 0
    err = capsys.readouterr().err
    assert len(read_calls(record)) == 2  # point 0 ran, point 1 failed, the rest did not start
    failed = [line for line in err.splitlines() if line.startswith("sweep: point 01_")]
    assert len(failed) == 1 and "exit code 1" in failed[0] and "stopping" in failed[0], err
    assert err.count(": not run") == len(points) - 2

    record.unlink()
    assert sweep.main([*args, "--keep_going"]) != 0
    err = capsys.readouterr().err
    assert len(read_calls(record)) == len(points)
    assert f"{len(points) - 1} of {len(points)} points succeeded" in err


# ----------------------------------------------------------------------------- tpu_pod.sh

def fake_gcloud_env(tmp_path):
    """PATH with a fake gcloud: scp copies into $HOME (one 'worker'), ssh runs --command with bash."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "gcloud", """
        #!/usr/bin/env bash
        set -euo pipefail
        printf '%s\\n' "$*" >> "$FAKE_GCLOUD_LOG"
        [ "$1 $2 $3" = "compute tpus tpu-vm" ] || exit 3
        case "$4" in
          scp) cp "$5" "$HOME/${6#*:}" ;;
          ssh) for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}" ;; esac; done; exit 4 ;;
          *) exit 5 ;;
        esac
    """)
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(home), TMPDIR=str(tmp_path),
               FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.log"))
    return env, home


def run_tpu_pod(*args, env=None):
    return subprocess.run(["bash", str(TPU_POD), *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=env)


def test_tpu_pod_dry_run_prints_every_command_and_calls_nothing(tmp_path):
    env, _ = fake_gcloud_env(tmp_path)
    result = run_tpu_pod("--tpu=my-pod", "--zone=us-central2-b", "--project=proj", "--dry_run",
                         "--config=configs/pretrain.py:vit_l,k400", "--workdir=gs://bucket/run",
                         "--", "--config.total_steps=5", "--config.data.path=gs://b/k400/train-*.tfrecord", env=env)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "gcloud.log").exists() and not list(tmp_path.glob("*.tar.gz"))  # nothing ran
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    assert [argv[0] for argv in lines] == ["tar", "gcloud", "gcloud", "gcloud"]
    tar, scp, install, start = lines
    assert "--exclude=.git" in tar and "--exclude=.venv" in tar and "--exclude=workdirs" in tar
    for argv in (scp, install, start):
        assert argv[1:4] == ["compute", "tpus", "tpu-vm"]
        assert "--zone=us-central2-b" in argv and "--project=proj" in argv and "--worker=all" in argv
    assert scp[4] == "scp" and scp[5] == tar[tar.index("-czf") + 1] and scp[6].startswith("my-pod:")
    assert install[4:6] == ["ssh", "my-pod"] and start[4:6] == ["ssh", "my-pod"]
    install_cmd = next(a for a in install if a.startswith("--command="))
    assert "tar -xzf" in install_cmd and "pip install" in install_cmd and "jax[tpu]" in install_cmd
    assert "-e " in install_cmd and "-m venv" in install_cmd
    start_cmd = next(a for a in start if a.startswith("--command="))[len("--command="):]
    assert "nohup" in start_cmd
    main_argv = shlex.split(start_cmd.split("nohup", 1)[1].split(">", 1)[0])
    assert main_argv[1:] == ["-m", "mae_st_jax.main", "--config=configs/pretrain.py:vit_l,k400",
                             "--workdir=gs://bucket/run", "--config.total_steps=5",
                             "--config.data.path=gs://b/k400/train-*.tfrecord"]


@pytest.mark.parametrize("args, word", [
    (["--zone=z", "--workdir=gs://b/r"], "--tpu"),
    (["--tpu=t", "--workdir=gs://b/r"], "--zone"),
    (["--tpu=t", "--zone=z"], "--workdir"),
    (["--tpu=t", "--zone=z", "--workdir=gs://b/r", "--config=configs/nope.py"], "configs/nope.py"),
    (["--tpu=t", "--zone=z", "--workdir=gs://b/r", "--bogus"], "--bogus"),
    (["--tpu=t", "--zone=z", "--workdir=gs://b/r", "--", "--workdir=x"], "--workdir"),
])
def test_tpu_pod_missing_or_bad_args_fail_with_one_line(args, word):
    result = run_tpu_pod(*args, "--dry_run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and result.stdout == ""
    assert len(lines) == 1 and lines[0].startswith("tpu_pod.sh: ") and word in lines[0], result.stderr


def test_tpu_pod_runs_against_fake_gcloud(tmp_path):
    """The real (not dry) path: code unpacked on the 'worker' without .git, main started there with the exact
    argv, quoting intact."""
    env, home = fake_gcloud_env(tmp_path)
    record = home / "argv.json"
    venv_bin = home / "mae_st_jax.venv" / "bin"
    venv_bin.mkdir(parents=True)
    write_exe(venv_bin / "python", f"""
        #!{sys.executable}
        import json, os, sys
        json.dump({{"cwd": os.getcwd(), "argv": sys.argv[1:]}}, open({str(record)!r}, "w"))
        print("training")
    """)
    result = run_tpu_pod("--tpu=t1", "--zone=z1", "--workdir=gs://b/r", "--skip_install", "--foreground",
                         "--", "--config.total_steps=5", "--config.data.path=it's a *", env=env)
    assert result.returncode == 0, result.stderr
    got = json.loads(record.read_text())
    assert got["cwd"] == str(home / "mae_st_jax")
    assert got["argv"] == ["-m", "mae_st_jax.main", "--config=configs/demo.py", "--workdir=gs://b/r",
                           "--config.total_steps=5", "--config.data.path=it's a *"]
    code = home / "mae_st_jax"
    assert (code / "launch" / "tpu_pod.sh").is_file() and (code / "configs" / "demo.py").is_file()
    assert not (code / ".git").exists() and not list(code.rglob("__pycache__"))
    assert "training" in (home / "mae_st_jax.log").read_text()
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    assert len(calls) == 3 and all("--worker=all" in c and "--zone=z1" in c for c in calls)
    assert not list(tmp_path.glob("*.tar.gz")) and not (home / "mae_st_jax.tar.gz").exists()  # cleaned up


# ----------------------------------------------------------------------------- gpu_slurm.sbatch

def test_slurm_script_parses_and_declares_its_layout():
    assert subprocess.run(["bash", "-n", str(SLURM)], capture_output=True).returncode == 0
    text = SLURM.read_text()
    directives = dict(re.findall(r"^#SBATCH (--[a-z-]+)(?:=(\S+))?", text, re.M))
    for key in ("--nodes", "--ntasks-per-node", "--gpus-per-node", "--time", "--output"):
        assert key in directives, key
    assert directives["--ntasks-per-node"] == directives["--gpus-per-node"]  # one process per GPU
    assert re.search(r"^srun .*\n?.*python -m mae_st_jax\.main", text, re.M)
    assert "set -euo pipefail" in text


def slurm_env(tmp_path, **extra):
    """A fake srun that records its argv and runs the command once, and a venv whose python records too."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    write_exe(bin_dir / "srun", f"""
        #!/usr/bin/env bash
        printf '%s\\n' "$@" > {tmp_path}/srun_args
        while [[ "$1" == -* ]]; do shift; done
        exec "$@"
    """)
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True, exist_ok=True)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    write_exe(venv_bin / "python", f"""
        #!{sys.executable}
        import json, os, sys
        if sys.argv[1:] == ["--version"]:
            print("Python 3.x"); sys.exit(0)
        if sys.argv[1] == "-c":  # the script's GPU check (FAKE_NO_GPU: a CPU-only jax)
            print("cpu"); sys.exit(1 if os.environ.get("FAKE_NO_GPU") else 0)
        json.dump({{"cwd": os.getcwd(), "argv": sys.argv[1:]}}, open({str(tmp_path / "main.json")!r}, "w"))
    """)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", VENV=str(tmp_path / "venv"),
                SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="123", **extra)


def test_slurm_script_runs_main_under_srun(tmp_path):
    env = slurm_env(tmp_path, SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_PER_NODE="h100:8")
    result = subprocess.run(["bash", str(SLURM), "configs/pretrain.py:vit_l,k400", "/shared/runs/vitl",
                             "--config.total_steps=10"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    got = json.loads((tmp_path / "main.json").read_text())
    assert got["cwd"] == str(ROOT)
    assert got["argv"] == ["-m", "mae_st_jax.main", "--config=configs/pretrain.py:vit_l,k400",
                           "--workdir=/shared/runs/vitl", "--config.total_steps=10"]
    assert {"--kill-on-bad-exit=1", "--cpus-per-task=8"} <= set((tmp_path / "srun_args").read_text().split())


@pytest.mark.parametrize("args, extra, word", [
    (["configs/demo.py"], {}, "usage"),
    (["configs/nope.py", "/w"], {}, "configs/nope.py"),
    (["configs/demo.py", "/w"], {"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_PER_NODE": "8"}, "--gpus-per-node=8"),
    (["configs/demo.py", "/w"], {"VENV": "/nonexistent/venv"}, "VENV"),
    (["configs/demo.py", "/w"], {"FAKE_NO_GPU": "1", "SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_PER_NODE": "8"},
     'sees no GPU (cpu): run'),
])
def test_slurm_script_errors(tmp_path, args, extra, word):
    env = slurm_env(tmp_path)
    env.update(extra)
    result = subprocess.run(["bash", str(SLURM), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and not (tmp_path / "main.json").exists()
    assert len(lines) == 1 and word in lines[0], result.stderr
