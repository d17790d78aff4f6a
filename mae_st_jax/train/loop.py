"""The training loop shared by pre-training and fine-tuning: workdir checks, sharded state
(fresh, init_from or resumed from the newest readable checkpoint), steps with logging, periodic
async checkpoints, preemption (SIGTERM or JAX's notice: save, wait, exit 0) and data-skip limits."""

import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import jax
from absl import logging
from clu import parameter_overview, periodic_actions

from mae_st_jax import config_lib, distributed
from mae_st_jax.data import pipeline
from mae_st_jax.train import checkpoint, step as step_lib
from mae_st_jax.train.logging import MetricsLog


@dataclasses.dataclass
class Outcome:
    """What a run ended with: last logged metrics, final state and whether it was preempted."""
    metrics: dict
    state: dict | None
    graphdef: object
    preempted: bool = False


class StopSignal:
    """Remembers a SIGTERM (preemption notice) so the loop can finish the step and save."""

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
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
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        probe = os.path.join(ckpt_dir, f".write_test_{jax.process_index()}")
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise OSError(f"workdir {workdir} is not writable ({e.strerror or e}): choose another --workdir") from e


def check_free_space(workdir: str, state_bytes: int) -> None:
    """Fail at start when a local workdir cannot hold two checkpoints of this state."""
    if "://" in workdir:
        return
    free = shutil.disk_usage(os.path.join(workdir, "checkpoints")).free
    if free < 2 * state_bytes:
        raise OSError(f"workdir {workdir} has {free / 2**30:.2f} GiB free, less than two checkpoints "
                      f"({2 * state_bytes / 2**30:.2f} GiB): free space or choose another --workdir")


def restore_newest(mgr, abstract_state):
    """(state, step) from the newest checkpoint that restores; unreadable ones are skipped with a warning."""
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            try:
                return checkpoint.restore_state(mgr, step, abstract_state), step
            except Exception:
                if not checkpoint.has_stacked_blocks(mgr, step):
                    raise
            logging.warning("Checkpoint step %d in %s has its blocks stacked on one [depth] axis (written "
                            "before they were stored per layer): splitting them per layer", step, mgr.directory)
            return checkpoint.restore_stacked_state(mgr, step, abstract_state), step
        except Exception as e:  # a corrupt or truncated checkpoint: fall back to the one before
            logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s); trying the previous one",
                            step, mgr.directory, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    return None, None


class RestoreError(RuntimeError):
    """A workdir holds checkpoints, but none of them fits this run's train state."""


def _tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def run(config, workdir: str, *, mesh, model_fn, tx, make_train_step, batch_shardings: dict, model_json: dict,
        init_params=None, after_step=None, name: str = "Training") -> Outcome:
    """Train `config` in `workdir`.

    model_fn(rngs) builds the model; make_train_step(graphdef, state_shardings) gives the jitted step;
    init_params() (optional) gives starting params when no checkpoint exists; after_step(done, state)
    may return extra metrics to log (validation).
    """
    total = config_lib.total_steps(config)
    check_writable(workdir)
    mgr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    fresh = not mgr.all_steps()
    params = init_params() if (init_params is not None and fresh) else None
    graphdef, state, state_sh = step_lib.create_state(model_fn, tx, mesh, config, params=params)
    check_free_space(workdir, _tree_bytes(state))
    start = 0
    if not fresh:
        restored, step = restore_newest(mgr, step_lib.abstract_with_shardings(state, state_sh))
        if restored is None:
            mgr.close()  # stop Orbax's threads before the error propagates (its restore threads
            # may still print asyncio 'Event loop is closed' tracebacks: seen in CI, harmless)
            raise RestoreError(f"no checkpoint in {mgr.directory} can be restored into this run's state (the "
                               "warnings above say why: another model size or config, or an older mae_st_jax "
                               "whose optimizer state differs): move it away to start afresh")
        state, start = restored, int(jax.device_get(restored["step"]))
        logging.info("Resuming from checkpoint step %d in %s", step, mgr.directory)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        with open(os.path.join(workdir, checkpoint.MODEL_JSON), "w") as f:
            json.dump(model_json, f, indent=2, default=list)
    if start >= total:
        logging.info("Nothing to do: checkpoint step %d >= total_steps %d", start, total)
        mgr.close()
        return Outcome({}, state, graphdef)

    parameter_overview.log_parameter_overview(state["params"], include_stats=False)
    train_step = make_train_step(graphdef, state_sh)
    loader = pipeline.ClipLoader(pipeline.make_source(config), config, process_index=jax.process_index(),
                                 process_count=jax.process_count())
    log = MetricsLog(workdir, resume_step=start)
    hooks = [periodic_actions.ReportProgress(num_train_steps=total, writer=log.writer)]
    if config.profile_start_step >= 0 and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(
            logdir=workdir, first_profile=config.profile_start_step + 1, num_profile_steps=config.profile_num_steps,
            profile_duration_ms=None, every_secs=None))

    last, t_last, step_last = {}, time.time(), start
    clips_seen, data_skipped = 0, 0  # this process, this run
    preempted, compiled = False, False
    logging.info("%s steps %d..%d, %d clips per step", name, start + 1, total, config.batch_size)
    try:
        with StopSignal() as stop:
            for step, host_batch in loader.iterate(start, prefetch=config.data.prefetch):
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
                if data_skipped > config.data.max_skip_fraction * clips_seen and data_skipped > 0:
                    raise RuntimeError(f"{data_skipped} of {clips_seen} clips came from unreadable videos, more than "
                                       f"config.data.max_skip_fraction={config.data.max_skip_fraction}: check the data")
                for h in hooks:
                    h(done)
                if done % config.log_every_steps == 0 or done == total or done == start + 1:
                    m = jax.device_get(metrics)
                    _check_finite(m, done, config)
                    now = time.time()
                    m["clips_per_sec"] = (done - step_last) * config.batch_size / max(now - t_last, 1e-9)
                    m["data_skipped"] = data_skipped
                    t_last, step_last = now, done
                    log.write(done, m)
                    last.update(m)
                if after_step is not None:
                    t_extra = time.time()
                    extra = after_step(done, state)
                    if extra:
                        log.write(done, extra)
                        last.update(extra)
                        t_last += time.time() - t_extra  # keep validation out of clips_per_sec
                preempted = stop.received or mgr.reached_preemption(done)
                if done % config.checkpoint_every_steps == 0 or done == total or preempted:
                    _check_finite(jax.device_get(metrics), done, config)  # never save a non-finite state
                    checkpoint.save_state(mgr, done, state, force=preempted)
                if preempted:
                    mgr.wait_until_finished()
                    logging.warning("Stopped for preemption after step %d: checkpoint committed in %s", done,
                                    mgr.directory)
                    break
    finally:
        mgr.wait_until_finished()
        mgr.close()
        log.flush()
        log.close()
    return Outcome(last, state, graphdef, preempted)


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


def _check_finite(m: dict, done: int, config) -> None:
    """Stop on a non-finite loss or gradient (skipped updates are counted by the step instead)."""
    finite = bool(m.pop("finite", True))
    if not finite and not config.skip_nonfinite:
        raise FloatingPointError(f"non-finite loss or gradient at step {done}: loss={m.get('loss')}, "
                                 f"grad_norm={m.get('grad_norm')} (config.skip_nonfinite=True skips such updates)")
