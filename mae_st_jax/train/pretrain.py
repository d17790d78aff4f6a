"""The pre-training loop: config -> mesh -> sharded state (fresh, resumed or init_from) -> steps,
with logging, periodic async checkpoints and a reconstruction figure at the end."""

import json
import os
import time

import jax
import numpy as np
from absl import logging
from clu import parameter_overview, periodic_actions
from flax import nnx

from mae_st_jax import config_lib
from mae_st_jax.data import pipeline
from mae_st_jax.models import MaskedAutoencoder
from mae_st_jax.train import checkpoint, optim, sharding as shd, step as step_lib
from mae_st_jax.train.logging import MetricsLog


def build_model(config, rngs: nnx.Rngs) -> MaskedAutoencoder:
    return MaskedAutoencoder(rngs=rngs, **config.model.to_dict())


def train(config, workdir: str) -> dict:
    """Run (or resume) pre-training in `workdir`; returns the last logged metrics."""
    config_lib.validate(config, jax.device_count(), jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    mesh = shd.make_mesh(config.mesh)
    total = config_lib.total_steps(config)
    tx, schedule = optim.make_optimizer(config, config_lib.schedule_steps(config), config_lib.warmup_steps(config))
    model_fn = lambda rngs: build_model(config, rngs)

    init_params = None
    if config.init_from:
        init_params, _ = checkpoint.load_params(config.init_from)
        logging.info("Initialising parameters from %s", config.init_from)
    graphdef, state, state_sh = step_lib.create_state(model_fn, tx, mesh, config, params=init_params)

    mgr = checkpoint.manager(workdir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    start = 0
    latest = mgr.latest_step()
    if latest is not None:
        state = checkpoint.restore_state(mgr, latest, step_lib.abstract_with_shardings(state, state_sh))
        start = int(jax.device_get(state["step"]))
        logging.info("Resuming from checkpoint step %d in %s", start, mgr.directory)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        with open(os.path.join(workdir, checkpoint.MODEL_JSON), "w") as f:
            json.dump(config.model.to_dict(), f, indent=2, default=list)
    if start >= total:
        logging.info("Nothing to do: checkpoint step %d >= total_steps %d", start, total)
        mgr.close()
        return {}

    parameter_overview.log_parameter_overview(state["params"], include_stats=False)
    train_step = step_lib.make_pretrain_step(graphdef, tx, schedule, mesh, config, state_sh)
    batch_sh = {"video": shd.batch_sharding(mesh, 6)}

    source = pipeline.make_source(config)
    loader = pipeline.ClipLoader(source, config, process_index=jax.process_index(),
                                 process_count=jax.process_count())
    log = MetricsLog(workdir, resume_step=start)
    report = periodic_actions.ReportProgress(num_train_steps=total, writer=log.writer)
    hooks = [report]
    if config.profile_start_step >= 0 and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(
            logdir=workdir, first_profile=config.profile_start_step + 1, num_profile_steps=config.profile_num_steps,
            profile_duration_ms=None, every_secs=None))

    last, t_last, step_last = {}, time.time(), start
    logging.info("Training steps %d..%d, %d clips per step", start + 1, total, config.batch_size)
    try:
        for step, host_batch in loader.iterate(start, prefetch=config.data.prefetch):
            if step >= total:
                break
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, pipeline.to_global(host_batch, batch_sh))
            done = step + 1
            for h in hooks:
                h(done)
            if done % config.log_every_steps == 0 or done == total or done == start + 1:
                m = jax.device_get(metrics)
                if not m.pop("finite"):
                    raise FloatingPointError(f"non-finite loss or gradient at step {done}: "
                                             f"loss={m['loss']}, grad_norm={m['grad_norm']}")
                now = time.time()
                m["clips_per_sec"] = (done - step_last) * config.batch_size / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                log.write(done, m)
                last = m
            if done % config.checkpoint_every_steps == 0 or done == total:
                if not bool(jax.device_get(metrics["finite"])):  # never save a non-finite state
                    raise FloatingPointError(f"non-finite loss or gradient at step {done}; not saving it")
                checkpoint.save_state(mgr, done, state)
    finally:
        mgr.wait_until_finished()
        mgr.close()
        log.flush()
    if config.write_reconstruction and jax.process_index() == 0:
        from mae_st_jax import visualize
        params = jax.device_get(state["params"])
        path = os.path.join(workdir, "reconstruction.png")
        visualize.reconstruction_figure(config, graphdef, params, source, path)
        logging.info("Wrote %s", path)
    log.close()
    return last
