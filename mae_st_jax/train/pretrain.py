"""Pre-training: config -> mesh -> the MAE-ST model and AdamW -> the shared loop (train/loop.py),
then a reconstruction figure."""

import os

import jax
from absl import logging
from flax import nnx

from mae_st_jax import config_lib
from mae_st_jax.data import pipeline
from mae_st_jax.models import MaskedAutoencoder
from mae_st_jax.train import checkpoint, loop, optim, sharding as shd, step as step_lib


def build_model(config, rngs: nnx.Rngs) -> MaskedAutoencoder:
    return MaskedAutoencoder(rngs=rngs, **config.model.to_dict())


def train(config, workdir: str) -> dict:
    """Run (or resume) pre-training in `workdir`; returns the last logged metrics."""
    return run(config, workdir).metrics


def run(config, workdir: str) -> loop.Outcome:
    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = shd.make_mesh(config.mesh)
    tx, schedule = optim.make_optimizer(config, config_lib.schedule_steps(config), config_lib.warmup_steps(config))

    def init_params():
        logging.info("Initialising parameters from %s", config.init_from)
        params, saved = checkpoint.load_params(config.init_from)
        if "decoder_embed" in params:  # a classifier's or encoder's params are refused by their shapes
            step_lib.check_saved_settings(saved, config.model, config.init_from, step_lib.UNSHAPED_MAE_SETTINGS)
        return params

    outcome = loop.run(
        config, workdir, mesh=mesh, model_fn=lambda rngs: build_model(config, rngs), tx=tx,
        make_train_step=lambda graphdef, sh: step_lib.make_pretrain_step(graphdef, tx, schedule, mesh, config, sh),
        batch_shardings={"video": shd.batch_sharding(mesh, 6)}, model_json=config.model.to_dict(),
        init_params=init_params if config.init_from else None, name="Pre-training")
    if config.write_reconstruction and jax.process_index() == 0 and outcome.metrics and not outcome.preempted:
        from mae_st_jax import visualize
        path = os.path.join(workdir, "reconstruction.png")
        visualize.reconstruction_figure(config, outcome.graphdef, jax.device_get(outcome.state["params"]),
                                        pipeline.make_source(config), path)
        logging.info("Wrote %s", path)
    return outcome
