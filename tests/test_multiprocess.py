"""Multi-host on localhost: 2 processes x 2 fake CPU devices (jax.distributed, gloo) train as 1 process x 4
devices does, each reading only its own clips; Orbax checkpoints written by several processes resume and
restore onto other process and device counts; the distributed start-up decision; the loop's memory report.

The subprocesses run this file as a script (`python tests/test_multiprocess.py SPEC`): it instruments the
clip loader and the metrics log, then runs the real command line (mae_st_jax.main with its flags)."""

import json
import os
import pickle
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, load_config_module

TIMEOUT = 600  # seconds per group of subprocesses: 2 shared CPU cores are slow
# a tiny model on configs/demo.py: 16 px, 4 frames, embed 32, depth 1, batch 8
TINY = {"model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2, "model.img_size": 16,
        "model.patch_size": 8, "model.num_frames": 4, "model.decoder_embed_dim": 32, "model.decoder_depth": 1,
        "model.decoder_num_heads": 2, "model.pred_t_dim": 2, "model.mask_ratio": 0.75,
        "data.num_videos": 64, "data.video_frames": 16, "data.num_workers": 1, "data.prefetch": 1,
        "batch_size": 8, "schedule_steps": 8, "warmup_steps": 2, "log_every_steps": 1,
        "checkpoint_every_steps": 2, "write_reconstruction": False, "fsdp_min_size": 256}
# params split over all 4 devices, i.e. across the 2 processes: each writes its own shards
FSDP4 = {"mesh.data": 1, "mesh.fsdp": 4, "param_sharding": "fsdp"}


# ----------------------------------------------------------------------------------------------------------
# the subprocess side


def _worker(spec: dict) -> None:
    """Run mae_st_jax.main with spec['flags'], recording what this process read and logged; write them (and,
    on process 0, the final state gathered from all processes) to spec['out']."""
    import jax
    from absl import app
    from jax.experimental import multihost_utils

    from mae_st_jax import main as cli
    from mae_st_jax.data import pipeline
    from mae_st_jax.train import logging as metrics_logging, loop

    reads, logged, outcomes = [], {}, []
    clip, write, run, compile_step = (pipeline.ClipLoader._clip, metrics_logging.MetricsLog.write, loop.run,
                                      loop.compile_step)

    def recording_clip(self, step, slot):  # every clip this process cuts: (step, global slot, video)
        reads.append((int(step), int(slot), self._video_index(self._position(step, slot))))
        return clip(self, step, slot)

    def recording_write(self, step, scalars):
        logged.setdefault(int(step), {}).update({k: float(v) for k, v in scalars.items()})
        return write(self, step, scalars)

    def recording_run(*args, **kwargs):
        outcomes.append(run(*args, **kwargs))
        return outcomes[-1]

    def slow_compile_step(*args):  # this host compiles for longer than a collective's set-up waits
        if jax.process_index() == 1:
            time.sleep(spec["slow_compile_s"])
        return compile_step(*args)

    pipeline.ClipLoader._clip, metrics_logging.MetricsLog.write, loop.run = recording_clip, recording_write, \
        recording_run
    if spec.get("slow_compile_s"):
        loop.compile_step = slow_compile_step
    try:
        # config_flags reads its --config.* overrides from sys.argv
        sys.argv = ["main", "--config=configs/demo.py", f"--workdir={spec['workdir']}", *spec["flags"]]
        app.run(cli.main)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    outcome = outcomes[-1]
    q = outcome.state["params"]["blocks"][0]["attn"]["q"]["kernel"]
    result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
              "reads": reads, "logged": {str(k): v for k, v in logged.items()},
              "mesh": dict(q.sharding.mesh.shape), "q_spec": str(q.sharding.spec),
              "q_shard_fraction": q.addressable_shards[0].data.size / q.size}
    state = multihost_utils.process_allgather(outcome.state, tiled=True)  # every process takes part
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}
        with open(spec["out"] + ".state.pkl", "wb") as f:
            pickle.dump(flat, f)
    with open(spec["out"], "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------------------------------
# the pytest side


def _flags(overrides: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path, n=4000) -> str:
    """The Python exception lines of a worker's output (a crash in C++ can bury them), then its end."""
    with open(path, errors="replace") as f:
        text = f.read()
    errors = [line[:400] for line in text.splitlines() if re.match(r"[\w.]+(Error|Exception): ", line)]
    return "\n".join(errors[-3:] + ["..."]) + "\n" + text[-n:]


def _start(tmp_path, name: str, workdir, *, processes: int, devices: int, overrides: dict,
           slow_compile_s: float = 0) -> dict:
    """Start `processes` workers with `devices` fake CPU devices each on one workdir."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    port = _free_port()
    run = {"name": name, "procs": [], "outs": [], "logs": [], "processes": processes, "devices": devices,
           "deadline": time.time() + TIMEOUT}
    for i in range(processes):
        flags = _flags({**TINY, **overrides})
        if processes > 1:
            flags += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
        out, log = tmp_path / f"{name}_{i}.json", tmp_path / f"{name}_{i}.log"
        spec = {"workdir": str(workdir), "out": str(out), "flags": flags, "slow_compile_s": slow_compile_s}
        with open(log, "w") as f:
            run["procs"].append(subprocess.Popen([sys.executable, __file__, json.dumps(spec)], cwd=ROOT, env=env,
                                                 stdout=f, stderr=subprocess.STDOUT))
        run["outs"].append(out)
        run["logs"].append(log)
    return run


def _wait(run: dict) -> list[dict]:
    """The started workers' results, by process; fails with the output tail of the first that failed."""
    name, procs, logs = run["name"], run["procs"], run["logs"]
    try:
        while any(p.poll() is None for p in procs):
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed or time.time() > run["deadline"]:
                i = failed[0] if failed else next(i for i, p in enumerate(procs) if p.poll() is None)
                why = f"exited with {procs[i].returncode}" if failed else f"still running after {TIMEOUT} s"
                pytest.fail(f"{name}: process {i} {why}; its output ends:\n{_tail(logs[i])}")
            time.sleep(0.5)
        for i, p in enumerate(procs):
            assert p.returncode == 0, f"{name}: process {i} exited with {p.returncode}:\n{_tail(logs[i])}"
    finally:
        _kill(run)  # the others would wait for a dead peer
    results = [json.loads(out.read_text()) for out in run["outs"]]
    for i, r in enumerate(results):
        r["log"] = logs[i].read_text(errors="replace")
        if r["process_index"] == 0:
            with open(str(run["outs"][i]) + ".state.pkl", "rb") as f:
                r["state"] = pickle.load(f)
    assert [r["process_index"] for r in results] == list(range(run["processes"]))
    assert all(r["process_count"] == run["processes"] and r["local_device_count"] == run["devices"]
               for r in results)
    return results


def _kill(run: dict) -> None:
    for p in run["procs"]:
        if p.poll() is None:
            p.kill()
            p.wait()


def _launch(*args, **kwargs) -> list[dict]:
    return _wait(_start(*args, **kwargs))


def _losses(result, steps) -> np.ndarray:
    return np.array([result["logged"][str(s)]["loss"] for s in steps])


def _reads(result, steps) -> set:
    return {(step, slot, video) for step, slot, video in result["reads"] if step in steps}


def _model_metrics(result) -> dict:
    """Logged metrics that come from the replicated step output (not this host's clock or data counters)."""
    return {step: {k: m[k] for k in ("loss", "grad_norm", "lr", "nonfinite_steps")}
            for step, m in result["logged"].items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_two_processes_train_as_one_read_disjoint_clips_and_share_checkpoints(tmp_path):
    # reference: one process with 4 devices, 5 straight steps; at the same time 2 processes x 2 devices run
    # 3 steps (checkpoints 2 and 3), later resumed to 5 in 2 processes again
    ref_run = _start(tmp_path, "ref", tmp_path / "ref", processes=1, devices=4, overrides={**FSDP4, "total_steps": 5})
    two_run = _start(tmp_path, "two", tmp_path / "two", processes=2, devices=2, overrides={**FSDP4, "total_steps": 3})
    try:
        (ref,), two = _wait(ref_run), _wait(two_run)
    finally:
        _kill(two_run)
    assert "Train step memory per device: arguments" in ref["log"]
    steps = [1, 2, 3]
    for r in two:
        assert r["device_count"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4}
        assert r["q_shard_fraction"] == 0.25  # the params really are split across processes
        np.testing.assert_allclose(_losses(r, steps), _losses(ref, steps), rtol=1e-4)
    assert _model_metrics(two[0]) == _model_metrics(two[1])  # both processes see the same replicated metrics
    # each process cut only clips of its own rows, and together exactly the one-process clips
    first, second = (_reads(r, {0, 1, 2}) for r in two)
    assert first and second and not first & second
    assert first | second == _reads(ref, {0, 1, 2})
    assert {slot % 8 for _, slot, _ in first} == {0, 1, 2, 3} and {slot % 8 for _, slot, _ in second} == {4, 5, 6, 7}
    assert not {v for _, _, v in first} & {v for _, _, v in second}  # repeat_aug: a video's clips stay on one host
    with open(tmp_path / "two" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == steps  # written once, by process 0
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "3"]

    # process 1 compiles 35 s longer: gloo's 30 s set-up would time out on process 0 without the loop's barrier
    resumed = _launch(tmp_path, "resumed", tmp_path / "two", processes=2, devices=2,
                      overrides={**FSDP4, "total_steps": 5}, slow_compile_s=35)
    for r in resumed:
        assert "Resuming from checkpoint step 3" in r["log"]
        assert sorted(r["logged"]) == ["4", "5"]
        np.testing.assert_allclose(_losses(r, [4, 5]), _losses(ref, [4, 5]), rtol=1e-4)
        assert min(step for step, _, _ in r["reads"]) == 3  # the data picked up where it stopped
    assert _model_metrics(resumed[0]) == _model_metrics(resumed[1])

    # the 2-process checkpoint in one process with 2 devices and a replicated mesh: the same values
    alone, = _launch(tmp_path, "alone", tmp_path / "two", processes=1, devices=2,
                     overrides={"mesh.data": -1, "mesh.fsdp": 1, "param_sharding": "replicate", "total_steps": 5})
    assert "Nothing to do: checkpoint step 5" in alone["log"]
    assert alone["mesh"] == {"data": 2, "fsdp": 1} and alone["q_shard_fraction"] == 1.0
    _assert_same_state(alone["state"], resumed[0]["state"])


def test_a_checkpoint_one_process_cannot_read_is_passed_over_by_every_process(tmp_path):
    """Params split over both processes: each reads its own shards, so damaged shard files of process 1 fail
    only there. Both fall back to the step before together and redo the same steps (process 0 used to resume
    from the damaged step while process 1 fell back alone: 'sync_global_devices name mismatch' on one, a lost
    gloo connection on the other)."""
    first = _launch(tmp_path, "first", tmp_path / "w", processes=2, devices=2, overrides={**FSDP4, "total_steps": 4})
    chunks = list((tmp_path / "w" / "checkpoints" / "4" / "default" / "ocdbt.process_1" / "d").iterdir())
    assert chunks
    for f in chunks:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    again = _launch(tmp_path, "again", tmp_path / "w", processes=2, devices=2, overrides={**FSDP4, "total_steps": 4})
    assert re.search(r"Checkpoint step 4 in \S+ cannot be restored \(process 1: ", again[0]["log"])
    assert re.search(r"Checkpoint step 4 in \S+ cannot be restored \(\w+: ", again[1]["log"])  # its own read
    for r in again:
        assert "Resuming from checkpoint step 2" in r["log"] and sorted(r["logged"]) == ["3", "4"]
        np.testing.assert_allclose(_losses(r, [3, 4]), _losses(first[0], [3, 4]), rtol=1e-6)
    assert os.listdir(tmp_path / "w" / "checkpoints_unreadable") == ["4"]  # set aside by process 0, kept
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["2", "4"]  # step 4 saved again


def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
    """A preemption notice that reaches one process (or reaches them in different steps): JAX's preemption
    service, not a per-process flag, decides the step, so both save it together and exit 0 (a per-process
    flag left the other process waiting in the next step's collective, for ever)."""
    import signal

    run = _start(tmp_path, "pre", tmp_path / "w", processes=2, devices=2,
                 overrides={**FSDP4, "total_steps": 200, "schedule_steps": 200, "checkpoint_every_steps": 100})
    metrics = tmp_path / "w" / "metrics.jsonl"
    try:
        while not (metrics.exists() and any(json.loads(line)["step"] >= 3 for line in
                                            metrics.read_text().splitlines() if line.endswith("}"))):
            assert all(p.poll() is None for p in run["procs"]) and time.time() < run["deadline"], \
                _tail(run["logs"][0])
            time.sleep(0.2)
        run["procs"][1].send_signal(signal.SIGTERM)
        results = _wait(run)
    finally:
        _kill(run)
    stopped = [re.findall(r"Stopped for preemption after step (\d+)", r["log"]) for r in results]
    assert len(stopped[0]) == 1 and stopped[0] == stopped[1], stopped
    step = int(stopped[0][0])
    assert 3 < step < 200
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == [str(step)]
    assert all(max(map(int, r["logged"])) == step for r in results)

def _main_processes(tmp_path, flags: list[str], per_process: dict | None = None, processes: int = 2,
                    cwds: dict | None = None):
    """Run `python -m mae_st_jax.main` in `processes` processes (1 fake device each; in cwds[i], else the
    repository); (return codes, last output lines)."""
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, "-m", "mae_st_jax.main", f"--config={ROOT}/configs/demo.py",
                               *_flags(TINY), *flags, *(per_process or {}).get(i, []),
                               f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                               f"--process_id={i}"], cwd=(cwds or {}).get(i, ROOT), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], [out.strip().splitlines()[-1] for out in outs]


def test_processes_given_different_configs_stop_at_once(tmp_path):
    codes, last = _main_processes(tmp_path, [f"--workdir={tmp_path / 'w'}"],
                                  per_process={1: ["--config.total_steps=6"]})
    assert codes == [1, 1], last
    for line in last:
        assert line == ("flag error: process 1 was given another config or workdir than process 0 (processes [1] "
                        "differ): every process must run the same command")


def test_a_workdir_the_processes_do_not_share_stops_them_at_start(tmp_path):
    """The same --workdir that names a folder of its own on each host (here: a relative path, another current
    folder per process): both stop at start with one line (the checkpoints' shards would be split across
    hosts, found out at the first save or resume); nothing is left in either folder but the empty layout."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    codes, last = _main_processes(tmp_path, ["--workdir=w"], cwds={0: tmp_path / "a", 1: tmp_path / "b"})
    assert codes == [1, 1], last
    want = (r"workdir w is not one folder that every process shares: this process finds nothing where process 0 "
            r"wrote w/\.shared_check; every process needs the same workdir, on storage they all mount .*")
    assert re.fullmatch(f"error: {want}", last[1]) and re.fullmatch(f"error: process 1: {want}", last[0]), last
    assert not (tmp_path / "a" / "w" / ".shared_check").exists()  # removed by process 0
    assert not os.listdir(tmp_path / "a" / "w" / "checkpoints") and not os.listdir(tmp_path / "b" / "w" / "checkpoints")


def test_an_init_from_only_one_process_finds_stops_every_process_in_one_line(tmp_path):
    """config.init_from (relative) names a pre-training workdir in process 0's current folder only: both stop
    with one line before anything trains (they took different branches of load_params, and the one that
    found nothing left the other waiting in the restore's sync)."""
    _launch(tmp_path, "src", tmp_path / "a" / "src", processes=1, devices=1, overrides={"total_steps": 1})
    (tmp_path / "b").mkdir()
    codes, last = _main_processes(tmp_path, [f"--workdir={tmp_path / 'w'}", "--config.init_from=src"],
                                  cwds={0: tmp_path / "a", 1: tmp_path / "b"})
    assert codes == [1, 1], last
    want = (r"error: config.init_from=src: (process 0: )?the processes find different things "
            r"there \(process 0: model.json,checkpoints; process 1: nothing\): it must be on storage every "
            r"process reads")
    assert all(re.fullmatch(want, line) for line in last), last
    assert not os.listdir(tmp_path / "w" / "checkpoints")


def test_a_start_up_error_on_one_process_stops_every_process_in_one_line(tmp_path):
    """Two shards of one video: process 1's shard holds no record. Both processes stop with the message
    (process 0 used to wait at the next barrier for an hour)."""
    from mae_st_jax.data import fake_videos, make_shards

    fake_videos.write_video(str(tmp_path / "v.mp4"), fake_videos.shape_frames(20, 32, 32), fps=30)
    (tmp_path / "list.txt").write_text("v.mp4 0\n")
    make_shards.convert(str(tmp_path / "list.txt"), str(tmp_path / "shards"), 2, short_side=32, workers=1)
    codes, last = _main_processes(tmp_path, [f"--workdir={tmp_path / 'w'}", "--config.data.source=tfrecord",
                                             f"--config.data.path={tmp_path / 'shards'}/*.tfrecord",
                                             "--config.data.num_videos=1"])
    assert codes == [1, 1], last
    message = f"config.data.path='{tmp_path / 'shards'}/*.tfrecord': the shards of process 1 hold no record"
    assert last == [f"error: process 1: {message}", f"error: {message}"]

def test_unreadable_videos_on_one_process_stop_every_process_at_the_same_step(tmp_path):
    """Half of process 1's videos are unreadable, none of process 0's: the skip limit is judged on the
    counts of all processes, so both stop at the same logged step with the same line (process 1 used to
    stop alone and leave process 0 waiting in the next step's collective)."""
    from test_faults import _shards_with_bad_jpegs

    path = _shards_with_bad_jpegs(tmp_path, num_videos=32, bad=lambda i: i % 2 == 1 and (i // 2) % 2 == 1)
    codes, last = _main_processes(tmp_path, [f"--workdir={tmp_path / 'w'}", "--config.data.source=tfrecord",
                                             f"--config.data.path={path}", "--config.data.num_videos=32",
                                             "--config.total_steps=60", "--config.schedule_steps=60",
                                             "--config.checkpoint_every_steps=100"])
    assert codes == [1, 1], last
    assert last[0] == last[1] and re.fullmatch(
        r"error: \d+ of \d+ clips came from unreadable videos, more than config.data.max_skip_fraction=0.1 .*",
        last[0]), last
    skipped, seen = map(int, re.findall(r"\d+", last[0])[:2])
    assert 0.15 < skipped / seen < 0.4  # a quarter of all clips (half of process 1's), summed over both


def test_a_process_that_fails_alone_ends_at_once_and_the_job_ends(tmp_path):
    """Every video of process 1 is unreadable, so its loader stops it before step 1 while process 0 waits
    for it. Process 1 exits 1 with its one line at once (a Python exit waited 300 s in JAX's shutdown
    barrier), and process 0 is stopped by JAX's missed-heartbeat check (100 s) instead of waiting."""
    from test_faults import _shards_with_bad_jpegs

    path = _shards_with_bad_jpegs(tmp_path, num_videos=64, bad=lambda i: i % 2 == 1)
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "mae_st_jax.main", "--config=configs/demo.py", *_flags(TINY),
                               f"--workdir={tmp_path / 'w'}", "--config.data.source=tfrecord",
                               f"--config.data.path={path}", "--config.total_steps=60",
                               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                              cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    try:
        deadline = time.time() + TIMEOUT
        while "Skipping unreadable video" not in (tmp_path / "p1.log").read_text(errors="replace"):
            assert procs[1].poll() is None and time.time() < deadline, _tail(tmp_path / "p1.log")
            time.sleep(0.5)
        failing = time.time()  # its 16 reads in a row fail within a second
        assert procs[1].wait(timeout=90) == 1  # the exit barrier's 20 s, not the 300 s shutdown barrier
        ended = time.time()
        assert procs[0].wait(timeout=240) != 0  # the job ends: process 0 does not wait for ever
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    out = (tmp_path / "p1.log").read_text(errors="replace")
    assert out.strip().splitlines()[-1].startswith("error: step 0: 16 videos in a row could not be read")
    assert "Shutdown barrier" not in out and ended - failing < 90


_GATHER = """
import sys, jax
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from mae_st_jax import distributed
from jax._src import distributed as jax_distributed
got = [distributed.gather("skips at step 1", f"{jax.process_index()},{10 * k}") for k in range(4)]
left = sorted(k for k, _ in jax_distributed.global_state.client.key_value_dir_get("mae_st_jax/"))
total = distributed.sum_over_processes("counts", jax.process_index() + 1, 5)
print("GOT", got, "LEFT", left, "SUM", total, flush=True)
"""


def test_gather_and_sum_give_every_process_the_same_values_and_keep_the_store_small(tmp_path):
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _GATHER, f"127.0.0.1:{port}", str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        _kill({"procs": procs})
    results = []
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        got, left, total = re.search(r"GOT (.*) LEFT (.*) SUM (.*)", out).groups()
        assert eval(total) == (1 + 2, 5 + 5)  # summed over both processes, the same on each
        results.append((eval(got), eval(left)))
    for got, left in results:
        assert got == [[f"0,{10 * k}", f"1,{10 * k}"] for k in range(4)]
        # each gather deletes this process's key of the one before: the first two calls left nothing
        assert left and all(int(k.split("/")[2]) >= 2 for k in left), left
    assert results[0][0] == results[1][0]


def test_restore_onto_fewer_devices_and_another_mesh(tmp_path):
    import jax

    from mae_st_jax.train import pretrain

    assert jax.device_count() == 8  # conftest: this process has 8 fake devices
    config = load_config_module("demo").get_config()
    for key, value in {**TINY, "mesh.data": 1, "mesh.fsdp": 8, "param_sharding": "fsdp", "total_steps": 1,
                       "async_checkpoints": False}.items():
        *parents, field = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[field] = value
    saved = pretrain.run(config, str(tmp_path / "w")).state
    q = saved["params"]["blocks"][0]["attn"]["q"]["kernel"]
    assert q.addressable_shards[0].data.size * 8 == q.size  # really split 8 ways
    expected = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(saved)}

    restored, = _launch(tmp_path, "four", tmp_path / "w", processes=1, devices=4,
                        overrides={"mesh.data": 2, "mesh.fsdp": 2, "param_sharding": "fsdp", "total_steps": 1})
    assert "Nothing to do: checkpoint step 1" in restored["log"]
    assert restored["device_count"] == 4 and restored["mesh"] == {"data": 2, "fsdp": 2}
    assert restored["q_shard_fraction"] == 0.5 and "fsdp" in restored["q_spec"]  # on the new mesh's shardings
    _assert_same_state(restored["state"], expected)


def test_partial_flags_fail_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mae_st_jax.main", "--config=configs/demo.py",
                           f"--workdir={tmp_path}", "--coordinator_address=127.0.0.1:1234"],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          env=dict(os.environ, XLA_FLAGS=""))
    assert proc.returncode != 0
    assert "missing --num_processes, --process_id" in proc.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------------------
# the start-up decision, without initialising anything


def test_explicit_flags():
    from mae_st_jax import distributed
    plan = distributed.decide("10.0.0.1:1234", 4, 2, environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"})
    assert (plan.mode, plan.coordinator_address, plan.num_processes, plan.process_id) == \
        ("explicit", "10.0.0.1:1234", 4, 2)
    assert plan.distributed


@pytest.mark.parametrize("args,missing", [
    (("10.0.0.1:1234", 0, -1), "--num_processes, --process_id"),
    (("", 2, -1), "--coordinator_address, --process_id"),
    (("", 0, 0), "--coordinator_address, --num_processes"),
    (("10.0.0.1:1234", 2, -1), "--process_id"),
])
def test_partial_flags_name_what_is_missing(args, missing):
    from mae_st_jax import distributed
    with pytest.raises(ValueError, match=f"missing {missing}") as e:
        distributed.decide(*args, environ={})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args,match", [
    (("10.0.0.1:1234", 2, 2), "must be smaller"),
    (("10.0.0.1", 2, 0), "needs a port"),
])
def test_bad_flags(args, match):
    from mae_st_jax import distributed
    with pytest.raises(ValueError, match=match):
        distributed.decide(*args, environ={})


SLURM = {"SLURM_JOB_ID": "1234", "SLURM_NTASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
         "SLURM_STEP_NODELIST": "node[001-002]"}


@pytest.mark.parametrize("environ,mode", [
    ({}, "single"),
    ({"HOME": "/root", "CUDA_VISIBLE_DEVICES": "0,1"}, "single"),
    (SLURM, "slurm"),
    ({**SLURM, "SLURM_NTASKS": "1"}, "single"),  # a one-task job is one process
    ({"SLURM_JOB_ID": "1234", "SLURM_NTASKS": "4"}, "single"),  # the batch script itself, not an srun step
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1,t1k-w-2,t1k-w-3", "TPU_WORKER_ID": "2"}, "tpu"),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.2:8476,10.0.0.3:8476", "TPU_WORKER_ID": "0"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, "single"),  # one host: nothing to join
    ({"TPU_WORKER_HOSTNAMES": "localhost", "MEGASCALE_NUM_SLICES": "2"}, "tpu"),  # multislice
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2",
      "OMPI_COMM_WORLD_RANK": "1"}, "ompi"),
    ({"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "1"}, "single"),
])
def test_auto_detection_from_environment(environ, mode):
    from mae_st_jax import distributed
    plan = distributed.decide(environ=environ)
    assert plan.mode == mode, plan.reason
    assert plan.distributed == (mode != "single")
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("", 0, -1)  # JAX reads the cluster


def test_tpu_vm_metadata_host_count():
    from mae_st_jax import distributed
    assert distributed.decide(environ={}, tpu_vm_process_count=4).mode == "tpu"
    assert distributed.decide(environ={}, tpu_vm_process_count=1).mode == "single"


def test_initialize_without_cluster_does_nothing():
    import jax

    from mae_st_jax import distributed
    plan = distributed.initialize()  # this pytest process: no flags, no cluster
    assert plan.mode in ("single", "already")
    assert jax.process_count() == 1


# ----------------------------------------------------------------------------------------------------------
# the loop's per-device memory report before step 1 (logged in every run above)


class _Compiled:
    def __init__(self, analysis):
        self.analysis = analysis

    def memory_analysis(self):
        if isinstance(self.analysis, Exception):
            raise self.analysis
        return self.analysis


def test_memory_analysis_report(caplog):
    import types

    import jax
    import jax.numpy as jnp

    from mae_st_jax.train import loop
    caplog.set_level("INFO")
    stats = types.SimpleNamespace(argument_size_in_bytes=3 * 2**30, output_size_in_bytes=2**20,
                                  temp_size_in_bytes=512 * 2**20, generated_code_size_in_bytes=2048,
                                  alias_size_in_bytes=2**20)
    sizes = loop.log_memory_analysis(_Compiled(stats))
    assert sizes == {"arguments": 3 * 2**30, "outputs": 2**20, "temp": 512 * 2**20, "generated code": 2048,
                     "aliased": 2**20}
    assert "arguments 3.00 GiB, outputs 1.00 MiB, temp 512.00 MiB, generated code 2.0 KiB" in caplog.text
    assert "total 3.50 GiB" in caplog.text
    assert loop.log_memory_analysis(_Compiled(None)) is None  # backends without an analysis
    assert loop.log_memory_analysis(_Compiled(NotImplementedError("no"))) is None
    assert caplog.text.count("memory analysis: not available") == 2
    real = jax.jit(lambda x: x @ x).lower(jnp.ones((64, 64))).compile()
    sizes = loop.log_memory_analysis(real)
    assert sizes is None or sizes["arguments"] == 64 * 64 * 4


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
