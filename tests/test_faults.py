"""Fault injection: kill -9 and resume, SIGTERM, NaN steps, corrupt checkpoints, bad workdirs."""

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mae_st_jax.train import checkpoint, loop, pretrain
from mae_st_jax.train.logging import read_metrics

from conftest import ROOT

# the tiny model of tests/conftest.py as command-line overrides of configs/demo.py
TINY = ["--config.model.embed_dim=32", "--config.model.depth=2", "--config.model.num_heads=2",
        "--config.model.img_size=32", "--config.model.patch_size=8", "--config.model.num_frames=4",
        "--config.model.decoder_embed_dim=32", "--config.model.decoder_depth=1",
        "--config.model.decoder_num_heads=2", "--config.model.pred_t_dim=2", "--config.data.num_videos=64",
        "--config.data.video_frames=16", "--config.data.num_workers=1", "--config.batch_size=8",
        "--config.warmup_steps=2", "--config.schedule_steps=40", "--config.log_every_steps=1",
        "--config.write_reconstruction=False"]


def _main(workdir, *extra):
    env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")  # one CPU device per process
    return subprocess.Popen([sys.executable, "-m", "mae_st_jax.main", "--config=configs/demo.py",
                             f"--workdir={workdir}", *TINY, *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(workdir) -> dict:
    return {m["step"]: m["loss"] for m in read_metrics(str(workdir))}


def _wait_for_step(workdir, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path) and any(m["step"] >= step for m in read_metrics(str(workdir))):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {workdir}")


def test_kill_9_at_random_points_then_resume_is_bit_identical(tmp_path):
    total = ["--config.total_steps=10", "--config.checkpoint_every_steps=2"]
    straight = _main(tmp_path / "straight", *total)
    assert straight.wait(timeout=600) == 0, straight.stdout.read()
    expected = _losses(tmp_path / "straight")
    assert sorted(expected) == list(range(1, 11))

    work = tmp_path / "killed"
    rng = random.Random(0)
    kills = []
    for _ in range(3):
        proc = _main(work, *total)
        first = max(_losses(work), default=0) + 1 if (work / "metrics.jsonl").exists() else 1
        target = min(first + rng.randint(0, 2), 9)
        _wait_for_step(str(work), target, proc)
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere: mid-step, mid-async-save, mid-log
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills.append(max(_losses(work)))
    final = _main(work, *total)
    out = final.stdout.read()
    assert final.wait(timeout=600) == 0, out
    assert "Resuming from checkpoint step" in out
    got = _losses(work)
    assert sorted(got) == list(range(1, 11)), (kills, got)
    assert got == expected  # every logged loss bit-identical to the uninterrupted run
    leftovers = [d for d in os.listdir(work / "checkpoints") if "tmp" in d]
    assert not leftovers, leftovers  # partial saves were cleaned up


def test_sigterm_saves_commits_and_exits_zero(tmp_path):
    proc = _main(tmp_path, "--config.total_steps=100000", "--config.checkpoint_every_steps=100000")
    assert _wait_for_step(str(tmp_path), 2, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out
    assert "Stopped for preemption after step" in out
    mgr = checkpoint.manager(str(tmp_path), async_save=False)
    step = mgr.latest_step()
    mgr.close()
    assert step is not None and 2 <= step < 100000
    assert max(_losses(tmp_path)) >= step - 0  # logged up to (at least) the saved step


def test_injected_nan_stops_by_default_naming_the_step(tiny_config, tmp_path):
    tiny_config.debug.inject_nan_at_step = 2  # the third step (0-based counter)
    with pytest.raises(FloatingPointError, match="step 3"):
        pretrain.train(tiny_config, str(tmp_path))
    mgr = checkpoint.manager(str(tmp_path), async_save=False)
    assert mgr.all_steps() == [2]  # the non-finite state after step 3 was never saved
    mgr.close()


def test_nan_between_logging_steps_names_the_range(tiny_config, tmp_path):
    tiny_config.debug.inject_nan_at_step = 3  # step 4; the flag is read at steps 3 (log) and 6 (log, checkpoint)
    tiny_config.update(log_every_steps=3, checkpoint_every_steps=6, total_steps=8)
    with pytest.raises(loop.NonFiniteError, match=r"non-finite loss or gradient at one of steps 4\.\.6:"):
        pretrain.train(tiny_config, str(tmp_path))


def test_injected_nan_is_skipped_and_counted(tiny_config, tmp_path):
    tiny_config.debug.inject_nan_at_step = 2
    tiny_config.skip_nonfinite = True
    outcome = pretrain.run(tiny_config, str(tmp_path))
    logged = read_metrics(str(tmp_path))
    assert [m["nonfinite_steps"] for m in logged] == [0, 0, 1, 1]
    assert not np.isfinite(logged[2]["loss"])
    assert np.all(np.isfinite(logged[3]["loss"]))
    assert int(outcome.state["nonfinite_steps"]) == 1
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(outcome.state["params"]))



def test_skipped_updates_in_a_row_stop_at_the_limit(tiny_config, tmp_path):
    """A run that only skips (every update from step 3 on is non-finite) stops once
    skip_nonfinite_limit updates in a row were skipped, naming them; its checkpoints hold finite params."""
    tiny_config.debug.update(inject_nan_at_step=2, inject_nan_count=1000)
    tiny_config.update(skip_nonfinite=True, skip_nonfinite_limit=4, log_every_steps=2, total_steps=12)
    with pytest.raises(loop.NonFiniteError, match=r"the last 4 updates \(steps 3\.\.6\) all had a non-finite "
                                                  r"loss or gradient and were skipped, config\.skip_nonfinite_limit=4"):
        pretrain.train(tiny_config, str(tmp_path))
    assert [m["nonfinite_steps"] for m in read_metrics(str(tmp_path))] == [0, 0, 2]  # steps 1, 2, 4
    mgr = checkpoint.manager(str(tmp_path), async_save=False)
    assert mgr.all_steps() == [2, 4]  # step 4's state is step 2's parameters (both updates skipped)
    restored = mgr.restore(4)
    mgr.close()
    assert int(np.asarray(restored["nonfinite_steps"])) == 2
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(restored["params"]))


def test_skipped_updates_below_the_limit_or_with_finite_ones_between_do_not_stop(tiny_config, tmp_path):
    tiny_config.debug.update(inject_nan_at_step=1, inject_nan_count=3)  # steps 2, 3 and 4
    tiny_config.update(skip_nonfinite=True, skip_nonfinite_limit=4, total_steps=6)
    outcome = pretrain.run(tiny_config, str(tmp_path))
    assert [m["nonfinite_steps"] for m in read_metrics(str(tmp_path))] == [0, 1, 2, 3, 3, 3]
    assert int(outcome.state["step"]) == 6
    tiny_config.update(skip_nonfinite_limit=3, total_steps=12)  # resumed at 6: the three are not "in a row" now
    tiny_config.debug.update(inject_nan_at_step=7, inject_nan_count=2)  # steps 8, 9: two more, not three
    outcome = pretrain.run(tiny_config, str(tmp_path))
    assert int(outcome.state["nonfinite_steps"]) == 5 and int(outcome.state["step"]) == 12


def _corrupt(step_dir, data_only=False):
    """Truncate every data file of a committed checkpoint to a few bytes (data_only: only the arrays' chunk
    files, the metadata stays readable)."""
    hit = 0
    for root, _, files in os.walk(step_dir):
        if data_only and os.path.basename(root) != "d":
            continue
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64:
                with open(path, "r+b") as f:
                    f.truncate(16)
                hit += 1
    assert hit > 0


@pytest.mark.parametrize("data_only", [False, True])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tiny_config, tmp_path, caplog, data_only):
    tiny_config.total_steps = 6
    pretrain.train(tiny_config, str(tmp_path / "straight"))
    expected = _losses(tmp_path / "straight")
    work = tmp_path / "work"
    tiny_config.total_steps = 4
    pretrain.train(tiny_config, str(work))  # checkpoints 2 and 4
    _corrupt(work / "checkpoints" / "4", data_only)
    tiny_config.total_steps = 6
    with caplog.at_level("INFO"):
        pretrain.train(tiny_config, str(work))  # warns about 4, resumes from 2
    assert "Checkpoint step 4" in caplog.text and "cannot be restored" in caplog.text
    assert "does not fit" not in caplog.text  # a damaged checkpoint, not one of another model or config
    assert "Resuming from checkpoint step 2" in caplog.text
    got = _losses(work)
    assert [got[s] for s in (3, 4, 5, 6)] == [expected[s] for s in (3, 4, 5, 6)]
    # the unreadable step 4 was moved aside (kept), so the run saved step 4 again: every listed step reads
    assert (work / "checkpoints_unreadable" / "4").is_dir()
    assert _readable_steps(work) == [2, 4, 6]


def _readable_steps(workdir) -> list[int]:
    steps = []
    for step in checkpoint.manager(str(workdir), async_save=False).all_steps():
        mgr = checkpoint.manager(str(workdir), async_save=False)
        try:
            mgr.restore(step)
            steps.append(step)
        except Exception:
            pass
        finally:
            mgr.close()
    return sorted(steps)


@pytest.mark.parametrize("damage", ["empty_newest", "corrupt_final"])
def test_unreadable_final_checkpoint_is_set_aside_and_saved_again(tiny_config, tmp_path, caplog, damage):
    """An empty step folder (Orbax lists it as committed) used to leave Orbax's manager unable to restore
    the good older steps; a corrupt final step used to stay, the rerun's final save silently skipped."""
    tiny_config.total_steps = 4
    pretrain.train(tiny_config, str(tmp_path))  # checkpoints 2 and 4
    expected = _losses(tmp_path)
    step_dir = tmp_path / "checkpoints" / "4"
    if damage == "empty_newest":
        for child in step_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    else:
        _corrupt(step_dir)
    with caplog.at_level("INFO"):
        pretrain.train(tiny_config, str(tmp_path))  # same total: redoes steps 3-4 from checkpoint 2
    assert "Resuming from checkpoint step 2" in caplog.text and "Moved the unreadable checkpoint step 4" in caplog.text
    assert _readable_steps(tmp_path) == [2, 4]
    assert _losses(tmp_path)[4] == expected[4]
    caplog.clear()
    with caplog.at_level("INFO"):
        pretrain.train(tiny_config, str(tmp_path))
    assert "Nothing to do: checkpoint step 4" in caplog.text


def test_init_from_skips_an_unreadable_newest_checkpoint(tiny_config, tmp_path):
    tiny_config.total_steps = 4
    pretrain.train(tiny_config, str(tmp_path))
    step2 = checkpoint.manager(str(tmp_path), async_save=False).restore(2)["params"]
    _corrupt(tmp_path / "checkpoints" / "4")
    params, _ = checkpoint.load_params(str(tmp_path))
    want = checkpoint.per_layer_blocks(jax.tree.map(np.asarray, step2))
    assert jax.tree.structure(params) == jax.tree.structure(want)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)))


def test_second_run_on_a_workdir_in_use_stops_at_once(tiny_config, tmp_path):
    with loop.WorkdirLock(str(tmp_path)):  # as a live run holds it
        with pytest.raises(loop.WorkdirInUse, match=f"in use by pid {os.getpid()}"):
            pretrain.train(tiny_config, str(tmp_path))
        assert not (tmp_path / "metrics.jsonl").exists()
    tiny_config.total_steps = 2
    pretrain.train(tiny_config, str(tmp_path))  # the lock is gone with its holder
    assert sorted(_losses(tmp_path)) == [1, 2]


def test_a_failed_start_releases_the_workdir_lock(tiny_config, tmp_path):
    """A notebook keeps the last exception (and so its frames, the lock file among them): the lock must be
    released when start-up fails, or the next run in the same kernel finds its own pid holding it."""
    bad = tiny_config.copy_and_resolve_references()
    bad.data.update(source="videos", path=str(tmp_path))  # a directory given as the list file
    with pytest.raises(Exception) as kept:
        pretrain.train(bad, str(tmp_path / "w"))
    assert kept.value is not None
    tiny_config.total_steps = 1
    pretrain.train(tiny_config, str(tmp_path / "w"))  # not WorkdirInUse
    assert sorted(_losses(tmp_path / "w")) == [1]

@pytest.mark.parametrize("code", ["ENOLCK", "EOPNOTSUPP", "ENOSYS"])
def test_a_filesystem_without_flock_trains_unlocked_with_a_warning(tmp_path, monkeypatch, caplog, code):
    """NFS mounted nolock, Lustre without -o flock: flock fails with these, which do not mean 'in use'."""
    import errno
    import fcntl

    def no_flock(*args):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level("WARNING"):
        with loop.WorkdirLock(str(tmp_path)) as lock:
            assert lock._file is None
    assert "does not support flock" in caplog.text
    monkeypatch.setattr(fcntl, "flock", lambda *a: (_ for _ in ()).throw(BlockingIOError(errno.EWOULDBLOCK, "busy")))
    with pytest.raises(loop.WorkdirInUse):  # a real conflict still stops
        loop.WorkdirLock(str(tmp_path)).__enter__()

def test_a_torn_metrics_line_does_not_block_resume(tiny_config, tmp_path, caplog):
    tiny_config.total_steps = 2
    pretrain.train(tiny_config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a crash mid-write
    assert sorted(_losses(tmp_path)) == [1, 2]
    tiny_config.total_steps = 4
    with caplog.at_level("WARNING"):
        pretrain.train(tiny_config, str(tmp_path))
    assert "dropped 1 unparsable (torn) line" in caplog.text
    assert sorted(_losses(tmp_path)) == [1, 2, 3, 4]


def test_a_misspelled_config_override_is_one_line(tmp_path):
    proc = _main(tmp_path / "a", "--config.total_stepz=2")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert out.strip().splitlines()[-1] == ('flag error: a --config override names no config field: total_stepz '
                                            '(Did you mean "total_steps" instead of "total_stepz"?)')

def test_an_error_inside_a_config_file_keeps_its_traceback(tmp_path):
    (tmp_path / "bad.py").write_text("from configs.demo import get_config as demo\n\n\ndef get_config():\n"
                                     "    c = demo()\n    c.model.detph = c.model.detph + 1\n    return c\n")
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "mae_st_jax.main", f"--config={tmp_path / 'bad.py'}",
                        f"--workdir={tmp_path / 'w'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode != 0 and "a --config override names no config field" not in r.stderr
    assert "bad.py" in r.stderr and "detph" in r.stderr  # the file and the line of the real mistake

def test_user_errors_are_one_line(tmp_path):
    """What a user causes prints one line and exits 1: no traceback."""
    proc = _main(tmp_path / "a", "--config.total_steps=2", f"--config.init_from={tmp_path / 'nothing'}")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert out.strip().splitlines()[-1] == (f"error: config.init_from={tmp_path / 'nothing'}: neither a parameter "
                                            f"checkpoint (params/) nor a training workdir (checkpoints/)")
    with loop.WorkdirLock(str(tmp_path / "b")):
        proc = _main(tmp_path / "b", "--config.total_steps=2")
        out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert out.strip().splitlines()[-1] == (f"error: workdir {tmp_path / 'b'} is in use by pid {os.getpid()} on "
                                            f"{socket.gethostname()}: wait for it, stop it, or choose another "
                                            f"--workdir")


def test_sigterm_during_the_final_save_commits_it(tmp_path):
    """The SIGTERM handler stays installed while the final checkpoint commits: the signal waits for it."""
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {os.path.join(str(ROOT), 'tests')!r})
from conftest import tiny
from mae_st_jax.train import checkpoint, pretrain
make, sent = checkpoint.manager, []
def manager(*a, **k):
    mgr = make(*a, **k)
    wait = mgr.wait_until_finished
    def wait_then_term():
        if sys._getframe(1).f_code.co_name in ("run", "_run") and not sent:  # the loop's final wait, not Orbax's
            sent.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # the preemption notice arrives while the last save commits
        return wait()
    mgr.wait_until_finished = wait_then_term
    return mgr
checkpoint.manager = manager
c = tiny()
c.total_steps, c.async_checkpoints = 2, True
pretrain.train(c, {str(tmp_path)!r})
print("finished")
"""
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "finished" in proc.stdout, (proc.returncode, proc.stderr[-3000:])
    assert _readable_steps(tmp_path) == [2]


def _stack_blocks(tree: dict) -> dict:
    """The layout of checkpoints written before the blocks were stored per layer."""
    out = dict(tree)
    for name in ("blocks", "decoder_blocks"):
        layers = [tree[name][k] for k in sorted(tree[name], key=int)]
        out[name] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return out


def test_workdir_with_stacked_blocks_resumes_bit_identically(tiny_config, tmp_path, caplog):
    import orbax.checkpoint as ocp
    tiny_config.total_steps = 2
    pretrain.train(tiny_config, str(tmp_path / "new"))  # checkpoint 2, per-layer blocks
    with ocp.StandardCheckpointer() as ckptr:
        path = tmp_path / "new" / "checkpoints" / "2" / "default"
        raw = ckptr.restore(str(path), checkpoint._host_target(ckptr, path))
    assert sorted(raw["params"]["blocks"], key=int) == ["0", "1"]
    old = {**raw, "params": _stack_blocks(raw["params"]),
           "opt_state": {k: (_stack_blocks(v) if k in ("mu", "nu") else v) for k, v in raw["opt_state"].items()}}
    assert old["opt_state"]["nu"]["blocks"]["attn"]["q"]["kernel"].shape[0] == 2
    mgr = checkpoint.manager(str(tmp_path / "old"), async_save=False)
    checkpoint.save_state(mgr, 2, old, force=True)
    mgr.close()
    tiny_config.total_steps = 4
    pretrain.train(tiny_config, str(tmp_path / "new"))
    with caplog.at_level("INFO"):
        pretrain.train(tiny_config, str(tmp_path / "old"))
    assert "has its blocks stacked" in caplog.text and "Resuming from checkpoint step 2" in caplog.text
    new_losses, old_losses = _losses(tmp_path / "new"), _losses(tmp_path / "old")
    assert [old_losses[s] for s in (3, 4)] == [new_losses[s] for s in (3, 4)]
    saved, _ = checkpoint.load_params(str(tmp_path / "old"))  # step 4, written per layer
    assert sorted(saved["blocks"]) == [0, 1]


def test_unwritable_workdir_fails_at_start_naming_it(tiny_config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="a_file.*not writable"):
        pretrain.train(tiny_config, str(blocker / "run"))


def test_full_disk_fails_at_start(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: type("U", (), {"free": 1024})())
    with pytest.raises(OSError, match="GiB free"):
        pretrain.train(tiny_config, str(tmp_path))


def test_free_space_check_counts_the_kept_checkpoints(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "_tree_bytes", lambda tree: 1000)
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: type("U", (), {"free": 3500})())
    tiny_config.keep_checkpoints, tiny_config.total_steps = 3, 2  # 3 kept + 1 being written: 4000 bytes
    with pytest.raises(loop.WorkdirError, match="config.keep_checkpoints=3"):
        pretrain.train(tiny_config, str(tmp_path))
    tiny_config.keep_checkpoints = 2  # 3000 bytes
    pretrain.train(tiny_config, str(tmp_path))
    assert sorted(_losses(tmp_path)) == [1, 2]


def test_failing_checkpoint_write_stops_and_keeps_the_last_good_one(tiny_config, tmp_path, monkeypatch, caplog):
    real_save = checkpoint.save_state

    def flaky(mgr, step, state, force=False):
        if step >= 4:
            raise OSError(28, "No space left on device")
        return real_save(mgr, step, state, force=force)

    monkeypatch.setattr(checkpoint, "save_state", flaky)
    tiny_config.total_steps = 6
    with pytest.raises(loop.WorkdirError, match="filled up while saving checkpoint step 4: the checkpoints "
                                                "committed before it are intact"):
        pretrain.train(tiny_config, str(tmp_path))
    monkeypatch.setattr(checkpoint, "save_state", real_save)
    mgr = checkpoint.manager(str(tmp_path), async_save=False)
    assert mgr.all_steps() == [2]
    mgr.close()
    # what a save that died half-way leaves (the disk it filled stays full until this goes)
    shutil.copytree(tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1")
    with caplog.at_level("INFO"):
        pretrain.train(tiny_config, str(tmp_path))  # resumes from the good checkpoint and finishes
    assert max(_losses(tmp_path)) == 6
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if "orbax-checkpoint-tmp" in p]
    # the resume's three managers deleted the folder at the same time: FileNotFoundError tracebacks
    assert "raised an exception" not in caplog.text and "Resuming from checkpoint step 2" in caplog.text
    # deleted before the manager is returned: Orbax's own thread outlived close(), and an exit right
    # after start-up printed its traceback from interpreter shutdown
    shutil.copytree(tmp_path / "checkpoints" / "2", tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1")
    mgr = checkpoint.manager(str(tmp_path), async_save=False, cleanup_tmp=True)
    assert not (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1").exists()
    mgr.close()


def _shards_with_bad_jpegs(directory, num_videos=20, bad_every=10, num_shards=2, bad=None):
    """TFRecord shards of synthetic videos (video i in shard i % num_shards); every `bad_every`-th video
    (or each i with bad(i)) has corrupt JPEG bytes."""
    import tensorflow as tf

    from mae_st_jax.data import records
    from mae_st_jax.data.synthetic import SyntheticVideos
    src = SyntheticVideos(num_videos, num_classes=4, num_frames=16, height=32, width=32, seed=3)
    writers = [tf.io.TFRecordWriter(str(directory / f"train-{k:05d}-of-{num_shards:05d}.tfrecord"))
               for k in range(num_shards)]
    for i in range(num_videos):
        jpegs = [records.encode_jpeg(f) for f in src.frames(i, np.arange(16))]
        if (bad(i) if bad else i % bad_every == bad_every - 1):
            jpegs = [b"\xff\xd8 not a jpeg" for _ in jpegs]
        writers[i % num_shards].write(records.encode_video(
            jpegs, fps=30.0, label=src.info(i).label, label_name="", path=f"v{i}", name=f"v{i}",
            height=32, width=32))
    for w in writers:
        w.close()
    return str(directory / "*.tfrecord")


def test_ten_percent_corrupt_records_train_and_are_counted(tiny_config, tmp_path):
    tiny_config.data.update(source="tfrecord", path=_shards_with_bad_jpegs(tmp_path), num_videos=20,
                            max_skip_fraction=0.5)
    tiny_config.total_steps = 6  # 6 steps x 4 videos > one epoch: the bad videos are drawn
    pretrain.train(tiny_config, str(tmp_path / "run"))
    logged = read_metrics(str(tmp_path / "run"))
    assert [m["step"] for m in logged] == list(range(1, 7))
    assert all(np.isfinite(m["loss"]) for m in logged)
    assert logged[-1]["data_skipped"] > 0  # each bad draw counted (repeat_aug clips per video)
    assert logged[-1]["data_skipped"] % tiny_config.data.repeat_aug == 0


def test_too_many_corrupt_records_stop_the_run(tiny_config, tmp_path):
    tiny_config.data.update(source="tfrecord", path=_shards_with_bad_jpegs(tmp_path, bad_every=2), num_videos=20,
                            max_skip_fraction=0.1)
    tiny_config.total_steps = 6
    with pytest.raises(RuntimeError, match="max_skip_fraction=0.1"):
        pretrain.train(tiny_config, str(tmp_path / "run"))


def test_one_bad_video_in_the_first_step_does_not_stop_the_run(tiny_config, tmp_path):
    """1 unreadable video in 20 (5%, under max_skip_fraction 0.1), drawn in step 1: 2 of its first 8
    clips were skipped, 25%, and the run stopped there. Now it trains on and counts the skip."""
    from mae_st_jax.data import pipeline

    tiny_config.data.update(source="tfrecord", path=_shards_with_bad_jpegs(tmp_path, bad_every=20), num_videos=20)
    assert tiny_config.data.max_skip_fraction == 0.1
    for seed in range(100):  # a seed whose step 1 draws the bad video
        tiny_config.seed = seed
        if pipeline.ClipLoader(pipeline.make_source(tiny_config), tiny_config).batch(0)["skipped"] > 0:
            break
    else:
        raise AssertionError("no seed draws the bad video in step 1")
    pretrain.train(tiny_config, str(tmp_path / "run"))
    logged = read_metrics(str(tmp_path / "run"))
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert logged[0]["data_skipped"] == tiny_config.data.repeat_aug == 2  # both clips of the bad video


@pytest.mark.parametrize("fraction, skipped, seen, stops", [
    (0.1, 2, 8, False),      # 1 of 4 videos: 25%, but chance explains it (mean 0.4, sd 0.6)
    (0.1, 4, 8, False),      # 2 of 4 videos: 2 < 0.4 + 3 x 0.6 = 2.2
    (0.1, 6, 8, True),       # 3 of 4 videos
    (0.1, 40, 400, False),   # 10%: at the threshold
    (0.1, 60, 400, False),   # 15% of 200 videos: 30 vs 20 + 3 x 4.24 = 32.7
    (0.1, 70, 400, True),    # 17.5%: 35 > 32.7
    (0.0, 2, 10**6, True),   # no tolerance: any skip stops
    (1.0, 10**6, 10**6, False),  # all skipped, but any fraction allowed
    (0.1, 0, 0, False),
])
def test_skip_limit_is_the_fraction_plus_three_standard_deviations(tiny_config, fraction, skipped, seen, stops):
    from mae_st_jax.data.errors import DataError
    from mae_st_jax.train import loop

    tiny_config.data.max_skip_fraction = fraction
    tiny_config.data.repeat_aug = 2
    if stops:
        with pytest.raises(DataError, match=f"{skipped} of {seen} clips came from unreadable videos"):
            loop.check_skips(tiny_config, skipped, seen)
    else:
        loop.check_skips(tiny_config, skipped, seen)


def test_resuming_a_workdir_of_another_model_size_exits_with_one_line(tmp_path):
    first = _main(tmp_path, "--config.total_steps=2", "--config.checkpoint_every_steps=2")
    assert first.wait(timeout=600) == 0, first.stdout.read()
    steps = sorted(os.listdir(tmp_path / "checkpoints"))
    # the same workdir with a wider model: the checkpoint exists but does not fit the train state
    other = _main(tmp_path, "--config.total_steps=4", "--config.model.embed_dim=64")
    out = other.stdout.read()
    assert other.wait(timeout=600) == 1
    # our own error is one line; Orbax's restore threads may still print asyncio "Event loop is
    # closed" tracebacks around it (library noise, timing-dependent), but none from our code
    lines = out.splitlines()
    want = f"resume: no checkpoint in {tmp_path / 'checkpoints'} can be restored into this run's state"
    assert sum(line.startswith(want) for line in lines) == 1, out[-3000:]
    assert not [line for line in lines if "mae_st_jax" in line and line.strip().startswith("File ")], out[-3000:]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == steps  # nothing deleted or overwritten
