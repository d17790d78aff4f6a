"""The training loop shared by pre-training and fine-tuning: workdir checks, sharded state
(fresh, init_from or resumed from the newest readable checkpoint), steps with logging, periodic
async checkpoints, preemption (SIGTERM or JAX's notice: save, wait, exit 0) and data-skip limits."""

import contextlib
import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import socket
import threading
import time
import uuid

import jax
from absl import logging
from clu import parameter_overview, periodic_actions

from mae_st_jax import config_lib, distributed, fileio
from mae_st_jax.data import pipeline
from mae_st_jax.data.errors import DataError
from mae_st_jax.train import checkpoint, step as step_lib
from mae_st_jax.train.errors import (  # noqa: F401 (loop.WorkdirError etc. are what main.py and the tests use)
    USER_ERRORS, DataSourceError, InitFromError, NonFiniteError, RestoreError, WorkdirError)
from mae_st_jax.train.logging import MetricsLog


@dataclasses.dataclass
class Outcome:
    """What a run ended with: last logged metrics, final state and whether it was preempted."""
    metrics: dict
    state: dict | None
    graphdef: object
    preempted: bool = False


class StopSignal:
    """Remembers a SIGTERM (preemption notice) so the loop can finish the step and save. With several
    processes JAX's preemption service handles SIGTERM instead (a Python handler would replace its
    handler): the processes must stop at the same step, which a per-process flag cannot give."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if distributed.preemption_service_running():
            logging.info("SIGTERM goes to JAX's preemption service: every process stops after the same step")
        elif threading.current_thread() is threading.main_thread():
            if jax.process_count() > 1:
                logging.warning("JAX's preemption service is off (jax_enable_preemption_service): a SIGTERM that "
                                "does not reach every process in the same step can hang the run")
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        logging.warning("Received signal %d: finishing this step, then saving a checkpoint", signum)
        self.received = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def check_writable(workdir: str) -> None:
    """Fail at start, naming the path, when the workdir cannot take a 1 MiB test write."""
    ckpt_dir = os.path.join(workdir, "checkpoints")
    probe = os.path.join(ckpt_dir, f".write_test_{jax.process_index()}")
    if fileio.is_url(workdir):  # a bucket: a small object written and removed through tf.io.gfile
        try:
            fileio.makedirs(ckpt_dir)
            fileio.write_text(probe, "probe")
            fileio.remove(probe)
        except Exception as e:
            raise WorkdirError(f"workdir {workdir} is not writable ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:200]}): check its URL and credentials") from None
        return
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if os.path.exists(probe):
            os.remove(probe)
        if e.errno == errno.ENOSPC:
            raise WorkdirError(f"workdir {workdir} is full (no space left on device): free space there (its "
                               f"checkpoints are what a run resumes from) or choose another --workdir") from None
        raise WorkdirError(f"workdir {workdir} is not writable ({e.strerror or e}): choose another --workdir") from None
    os.remove(probe)


def check_free_space(workdir: str, state_bytes: int, keep: int = 1) -> None:
    """Fail at start when a local workdir cannot hold the keep + 1 checkpoints of this state that exist
    while a save is in flight (minus those already there, which the new ones replace)."""
    if fileio.is_url(workdir):
        return
    ckpt_dir = os.path.join(workdir, "checkpoints")
    free = shutil.disk_usage(ckpt_dir).free
    have = sum(1 for d in os.listdir(ckpt_dir) if d.isdigit())
    need = max(1, keep + 1 - have) * state_bytes
    if free < need:
        raise WorkdirError(f"workdir {workdir} has {free / 2**30:.2f} GiB free, less than the {need / 2**30:.2f} GiB "
                           f"that config.keep_checkpoints={keep} checkpoints (plus one being written) need: free "
                           f"space, keep fewer checkpoints, or choose another --workdir")


def restore_newest(mgr, abstract_state, steps=None):
    """(state, step, unreadable newer steps) from the newest of `steps` (default: all that mgr lists) that
    restores into `abstract_state` (checkpoint.newest_readable), blocks written stacked included."""
    def restore(mgr, step):
        try:
            return checkpoint.restore_state(mgr, step, abstract_state)
        except Exception as first:
            try:
                stacked = checkpoint.has_stacked_blocks(mgr, step)
            except Exception:
                stacked = False
            if not stacked:
                raise checkpoint.describe_restore_failure(mgr, step, abstract_state, first) from first
        logging.warning("Checkpoint step %d in %s has its blocks stacked on one [depth] axis (written "
                        "before they were stored per layer): splitting them per layer", step, mgr.directory)
        return checkpoint.restore_stacked_state(mgr, step, abstract_state)

    return checkpoint.newest_readable(mgr, restore, steps)


def _init_from_error(config, message: str) -> "InitFromError":
    """'config.init_from=DIR: MESSAGE' on one line, without load_params' own 'init_from=DIR: ' prefix again."""
    message = " ".join(message.split()).replace(f"init_from={config.init_from}: ", "", 1)
    return InitFromError(f"config.init_from={config.init_from}: {message}")


def set_aside(workdir: str, steps) -> None:
    """Move unreadable checkpoint steps newer than the one resumed from out of `checkpoints/` (into
    `checkpoints_unreadable/STEP`, never deleted): Orbax would otherwise skip saving those steps
    again (it saves no step at or below the newest it lists), silently losing e.g. the final one."""
    if not steps or jax.process_index() != 0:
        return
    base = checkpoint.absolute(workdir)
    aside = base / "checkpoints_unreadable"
    aside.mkdir(parents=True, exist_ok=True)
    for step in steps:
        src, dst = base / "checkpoints" / str(step), aside / str(step)
        if dst.exists():
            dst = aside / f"{step}.{int(time.time())}"
        try:
            src.rename(dst)
        except Exception as e:
            raise WorkdirError(f"cannot move the unreadable checkpoint {src} aside to {dst} ({e}): move or delete it "
                               f"by hand, or the run will not save step {step} again") from e
        logging.warning("Moved the unreadable checkpoint step %d to %s", step, dst)


def _tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


SHARED_CHECK = ".shared_check"  # written by process 0 at start, read by the others, then removed


def check_shared(workdir: str, wait_s: float = 10.0) -> None:
    """WorkdirError on every process when one does not find in the workdir the token process 0 just wrote
    there: that host has a folder of its own at this path (/tmp or a local disk), and the checkpoints, of
    which every process writes its own shards, would be split across hosts, found out only at the first
    save or resume. A file system that caches listings gets wait_s to show the file."""
    if jax.process_count() == 1:
        return
    path, token, error = os.path.join(workdir, SHARED_CHECK), "", None
    if jax.process_index() == 0:
        token = f"{uuid.uuid4().hex} pid {os.getpid()} on {socket.gethostname()}"
        try:
            fileio.write_text(path, token)
        except Exception as e:
            error = f"cannot write {path} ({type(e).__name__}: {e})"
    want = distributed.gather("workdir token", token)[0]
    deadline = time.time() + wait_s
    while jax.process_index() != 0 and error is None:
        try:
            seen = fileio.read_text(path).strip() if fileio.exists(path) else "nothing"
        except Exception as e:
            seen = f"an unreadable file ({type(e).__name__})"
        if seen == want:
            break
        if time.time() > deadline:
            error = (f"workdir {workdir} is not one folder that every process shares: this process finds {seen} "
                     f"where process 0 wrote {path}; every process needs the same workdir, on storage they all "
                     f"mount (a shared file system or a gs:// bucket)")
        else:
            time.sleep(0.5)
    message = distributed.first_error("shared workdir", error)
    if jax.process_index() == 0:  # past first_error's barrier: every process has looked
        try:
            fileio.remove(path)
        except Exception:
            pass
    if message is not None:
        raise WorkdirError(message)


class WorkdirInUse(WorkdirError):
    """Another live process is training in this workdir."""


class WorkdirLock:
    """An exclusive flock on `workdir/.lock` (local workdirs, process 0) for the whole run, so a second
    run started on the same workdir stops at once instead of truncating the first one's metrics and
    racing its checkpoints. The kernel drops the lock when its process dies: no stale locks."""

    def __init__(self, workdir: str):
        self.path = None if fileio.is_url(workdir) or jax.process_index() else os.path.join(workdir, ".lock")
        self._file = None

    def __enter__(self):
        if self.path is None:
            return self
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock on this filesystem
                f.close()
                logging.warning("workdir %s: its filesystem does not support flock (%s): running without the "
                                "lock that stops a second run on the same workdir", os.path.dirname(self.path),
                                os.strerror(e.errno) if e.errno else e)
                return self
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise WorkdirInUse(f"workdir {os.path.dirname(self.path)} is in use by {holder}: wait for it, stop it, "
                               f"or choose another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()  # releases the flock
            self._file = None


def run(config, workdir: str, **kwargs) -> Outcome:
    """Train `config` in `workdir` (see _run), holding the workdir's lock. The start-up checks (the workdir
    writable and free, this process's data) end the same way on every process: a failure on one stops
    them all with its one-line message, instead of leaving the others waiting at the first barrier."""
    lock, error, source = WorkdirLock(workdir), None, None
    try:  # the lock is released however this ends
        try:
            check_writable(workdir)
            lock.__enter__()
            source = pipeline.make_source(config)
        except Exception as e:
            if jax.process_count() == 1 and not isinstance(e, USER_ERRORS + (ValueError,)):
                raise  # one process: a missing file keeps its type (and traceback)
            error = e
        message = distributed.first_error("start-up checks", error)
        if message is not None:
            if isinstance(error, USER_ERRORS):
                raise error
            if error is not None:  # not one of ours: its traceback in the log, the error itself one line
                logging.info("Start-up check failed on this process", exc_info=error)
            if isinstance(error, ValueError):  # the data source's own checks (no shards, too few files, labels)
                raise DataSourceError(message) from None
            raise (WorkdirError if error is None else DataError)(message) from None
        check_shared(workdir)
        return _run(config, workdir, source=source, **kwargs)
    finally:
        lock.__exit__(None, None, None)


def _run(config, workdir: str, *, source, mesh, model_fn, tx, make_train_step, batch_shardings: dict, model_json: dict,
         init_params=None, after_step=None, name: str = "Training") -> Outcome:
    """Train `config` in `workdir`.

    model_fn(rngs) builds the model; make_train_step(graphdef, state_shardings) gives the jitted step;
    init_params() (optional) gives starting params when no checkpoint exists; after_step(done, state)
    may return extra metrics to log (validation).
    """
    total = config_lib.total_steps(config)
    make_manager = lambda: checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints,
                                              async_save=config.async_checkpoints, cleanup_tmp=True)
    mgr = make_manager()
    try:  # set-up: whatever ends it early closes the manager
        steps = checkpoint.agreed_steps(mgr)
        fresh = not steps
        from_init = init_params is not None and fresh
        params, error = None, None
        if from_init:  # each process reads its own copy: all go on, or all stop with the first failure's line
            try:
                params = init_params()
            except Exception as e:
                if not isinstance(e, (FileNotFoundError, ValueError)):
                    if jax.process_count() == 1:
                        raise  # not a missing or mismatched checkpoint: its traceback
                    logging.info("Reading config.init_from failed on this process", exc_info=e)
                error = e
            message = distributed.first_error("init_from", error)
            if message is not None:
                raise _init_from_error(config, message) from error
        try:
            graphdef, state, state_sh = step_lib.create_state(model_fn, tx, mesh, config, params=params)
        except (FileNotFoundError, ValueError) as e:
            if not from_init:
                raise
            raise _init_from_error(config, str(e)) from e
        check_free_space(workdir, _tree_bytes(state), config.keep_checkpoints)
        start = 0
        if not fresh:
            restored, step, unreadable = restore_newest(mgr, step_lib.abstract_with_shardings(state, state_sh), steps)
            if restored is None:
                raise RestoreError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')} can be restored into "
                                   "this run's state (the warnings above say why: another model size or config, or an "
                                   "older mae_st_jax whose optimizer state differs): move it away to start afresh")
            if unreadable:
                mgr, old = None, mgr
                old.close()
                set_aside(workdir, unreadable)
                distributed.barrier("unreadable checkpoints set aside")
                mgr = make_manager()  # lists the steps as they are now
                checkpoint.agreed_steps(mgr)  # a listing that one host caches would make Orbax skip a save there alone
            state, start = restored, int(jax.device_get(restored["step"]))
            logging.info("Resuming from checkpoint step %d in %s", step, mgr.directory)
        if jax.process_index() == 0:
            fileio.write_text(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
            fileio.write_text(os.path.join(workdir, checkpoint.MODEL_JSON),
                              json.dumps(model_json, indent=2, default=list))
        if start >= total:
            logging.info("Nothing to do: checkpoint step %d >= total_steps %d", start, total)
            mgr.close()
            return Outcome({}, state, graphdef)

        parameter_overview.log_parameter_overview(state["params"], include_stats=False)
        train_step = make_train_step(graphdef, state_sh)
        loader = pipeline.ClipLoader(source, config, process_index=jax.process_index(),
                                     process_count=jax.process_count())
        log = MetricsLog(workdir, resume_step=start)
        hooks = [periodic_actions.ReportProgress(num_train_steps=total, writer=log.writer)]
        if config.profile_start_step >= 0 and jax.process_index() == 0:
            hooks.append(periodic_actions.Profile(
                logdir=workdir, first_profile=config.profile_start_step + 1, num_profile_steps=config.profile_num_steps,
                profile_duration_ms=None, every_secs=None))
    except BaseException:
        if mgr is not None:
            mgr.close()
        raise

    last, t_last, step_last = {}, time.time(), start
    clips_seen, data_skipped = 0, 0  # this process, this run (summed over the processes when logged)
    watch = _FiniteWatch(config, start, int(jax.device_get(state.get("nonfinite_steps", 0))))
    preempted, compiled = False, False
    logging.info("%s steps %d..%d, %d clips per step", name, start + 1, total, config.batch_size)
    with StopSignal() as stop:  # also over the final save's commit: a SIGTERM there waits for it
        try:
            for step, host_batch in loader.iterate(start, prefetch=config.data.prefetch,
                                                         timeout_s=config.data.read_timeout_s):
                if step >= total:
                    break
                batch = pipeline.to_global(host_batch, batch_shardings)
                if not compiled:  # once, before step 1: compile ahead of time and report memory; then all
                    # hosts start step 1 together (a collective's set-up can time out waiting for a slow host)
                    train_step, compiled = compile_step(train_step, state, batch), True
                    distributed.barrier("train step compiled")
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    state, metrics = train_step(state, batch)
                done = step + 1
                clips_seen += host_batch["video"].shape[0] * host_batch["video"].shape[1]
                data_skipped += int(host_batch.get("skipped", 0))
                for h in hooks:
                    h(done)
                if done % config.log_every_steps == 0 or done == total or done == start + 1:
                    m = jax.device_get(metrics)
                    watch.check(m, done)
                    skipped_all, seen_all = distributed.sum_over_processes(f"skips at step {done}", data_skipped,
                                                                           clips_seen)
                    now = time.time()
                    m["clips_per_sec"] = (done - step_last) * config.batch_size / max(now - t_last, 1e-9)
                    m["data_skipped"] = skipped_all
                    t_last, step_last = now, done
                    log.write(done, m)
                    last.update(m)
                    check_skips(config, skipped_all, seen_all)  # every process, the same counts: all stop or none
                if after_step is not None:
                    t_extra = time.time()
                    extra = after_step(done, state)
                    if extra:
                        log.write(done, extra)
                        last.update(extra)
                        t_last += time.time() - t_extra  # keep validation out of clips_per_sec
                preempted = stop.received or mgr.reached_preemption(done)
                if done % config.checkpoint_every_steps == 0 or done == total or preempted:
                    watch.check(jax.device_get(metrics), done)  # never save NaNs
                    with _disk_full_is_one_line(workdir, done):
                        saved = checkpoint.save_state(mgr, done, state, force=preempted)
                    if not saved:
                        logging.warning("Checkpoint step %d was not saved (Orbax lists a step >= %d in %s)", done,
                                        done, mgr.directory)
                if preempted:
                    with _disk_full_is_one_line(workdir, done):
                        mgr.wait_until_finished()
                    logging.warning("Stopped for preemption after step %d: checkpoint committed in %s", done,
                                    mgr.directory)
                    break
        finally:
            try:
                with _disk_full_is_one_line(workdir, "the last"):
                    mgr.wait_until_finished()
            finally:
                mgr.close()
                log.flush()
                log.close()
    return Outcome(last, state, graphdef, preempted)


def _is_disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "RESOURCE_EXHAUSTED" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def _disk_full_is_one_line(workdir: str, step):
    """A full disk while saving (Orbax raises it from its writer threads, hundreds of lines) becomes
    one WorkdirError; the checkpoints committed before it stay as they were."""
    try:
        yield
    except Exception as e:
        if not _is_disk_full(e):
            raise
        raise WorkdirError(f"the disk of workdir {workdir} filled up while saving checkpoint step {step}: the "
                           f"checkpoints committed before it are intact; free space (or lower "
                           f"config.keep_checkpoints) and rerun to resume") from None


def compile_step(train_step, state, batch):
    """The jitted step compiled ahead of time for these arguments (the loop then calls the executable, so
    there is no second compilation), with its per-device memory use logged; `train_step` itself when it
    cannot be lowered."""
    if not hasattr(train_step, "lower"):
        logging.info("Train step memory analysis: not available (the step is not a jitted function)")
        return train_step
    t0 = time.time()
    compiled = train_step.lower(state, batch).compile()
    logging.info("Compiled the train step in %.1f s", time.time() - t0)
    log_memory_analysis(compiled)
    return compiled


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def log_memory_analysis(compiled, name: str = "Train step") -> dict | None:
    """Log (and return) the compiled program's per-device memory: arguments, outputs, temporaries, code."""
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # some backends do not implement it
        logging.info("%s memory analysis: not available (%s: %s)", name, type(e).__name__, e)
        return None
    if stats is None:
        logging.info("%s memory analysis: not available on %s", name, jax.default_backend())
        return None
    fields = {"arguments": "argument_size_in_bytes", "outputs": "output_size_in_bytes",
              "temp": "temp_size_in_bytes", "generated code": "generated_code_size_in_bytes",
              "aliased": "alias_size_in_bytes"}
    sizes = {k: int(getattr(stats, a, 0) or 0) for k, a in fields.items()}
    peak = sizes["arguments"] + sizes["outputs"] + sizes["temp"] + sizes["generated code"] - sizes["aliased"]
    logging.info("%s memory per device: %s; total %s (outputs aliased with donated arguments counted once)",
                 name, ", ".join(f"{k} {_size(v)}" for k, v in sizes.items()), _size(peak))
    return sizes


def check_skips(config, skipped: int, seen: int) -> None:
    """DataError when more of the clips came from unreadable videos than config.data.max_skip_fraction
    allows, beyond chance: counted in videos (the repeat_aug clips of one video are skipped together),
    `skipped` must exceed max_skip_fraction of them by 3 binomial standard deviations, so that one bad
    video among a run's first few does not stop it (it did, at 1 skip in the first 8 clips); with
    max_skip_fraction 0 any skip stops the run, with 1 none does."""
    fraction, per_video = config.data.max_skip_fraction, max(1, config.data.repeat_aug)
    videos, bad = seen / per_video, skipped / per_video
    if skipped > 0 and bad > fraction * videos + 3 * math.sqrt(fraction * (1 - fraction) * videos):
        raise DataError(f"{skipped} of {seen} clips came from unreadable videos, more than "
                        f"config.data.max_skip_fraction={fraction} allows (by over 3 standard deviations): "
                        f"check the data (the warnings above name the videos)")


class _FiniteWatch:
    """Stops on a non-finite loss or gradient (skipped updates are counted by the step instead) and, with
    config.skip_nonfinite, on config.skip_nonfinite_limit skipped updates in a row. The flags are read at
    logging and checkpoint steps only (no host sync in between), so messages give the range a bad step
    lies in, and a run of skipped updates is seen a whole logging interval at a time."""

    def __init__(self, config, start: int, skipped: int):
        self.skip, self.limit = bool(config.skip_nonfinite), int(config.skip_nonfinite_limit)
        self.ok = start  # the newest step whose loss and gradient were seen finite
        self.seen_step, self.seen_skipped, self.in_a_row = start, skipped, 0

    def check(self, m: dict, done: int) -> None:
        finite = bool(m.pop("finite", True))
        if not finite and not self.skip:
            first = f"step {done}" if self.ok >= done - 1 else f"one of steps {self.ok + 1}..{done}"
            raise NonFiniteError(f"non-finite loss or gradient at {first}: loss={m.get('loss')}, "
                                 f"grad_norm={m.get('grad_norm')} (config.skip_nonfinite=True skips such updates)")
        if finite:
            self.ok = done
        if not self.skip or "nonfinite_steps" not in m or done <= self.seen_step:
            return
        skipped = int(m["nonfinite_steps"])
        steps = done - self.seen_step
        # every step since the last look skipped: the run goes on; one fine: it restarts (conservatively at 0)
        self.in_a_row = self.in_a_row + steps if skipped - self.seen_skipped >= steps else 0
        self.seen_step, self.seen_skipped = done, skipped
        if self.limit and self.in_a_row >= self.limit:
            raise NonFiniteError(
                f"the last {self.in_a_row} updates (steps {done - self.in_a_row + 1}..{done}) all had a non-finite "
                f"loss or gradient and were skipped, config.skip_nonfinite_limit={self.limit}: the run has diverged "
                f"(or its data is bad); the checkpoints hold the parameters from before them (lower the lr, "
                f"or raise the limit, 0 for none)")
