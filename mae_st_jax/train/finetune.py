"""Fine-tuning: a VideoClassifier (encoder from init_from), layer-decayed AdamW, the shared loop, validation."""

import inspect

import jax
import numpy as np
from absl import logging
from flax import nnx

from mae_st_jax import config_lib
from mae_st_jax.data import pipeline, validation
from mae_st_jax.models import VideoClassifier
from mae_st_jax.models.mae import VideoEncoder
from mae_st_jax.train import finetune_step, loop, optim, sharding as shd, warm_start

ENCODER_KEYS = tuple(k for k in inspect.signature(VideoEncoder.__init__).parameters if k not in ("self", "rngs"))


def classifier_kwargs(config) -> dict:
    """VideoClassifier arguments: config.model's encoder fields (the MAE-only ones dropped) and the head's."""
    f = config.finetune
    encoder = {k: v for k, v in config.model.to_dict().items() if k in ENCODER_KEYS}
    probe = bool(f.get("linear_probe", False))  # a frozen encoder runs without stochastic depth
    return dict(encoder, num_classes=config.data.num_classes, drop_path_rate=0.0 if probe else f.drop_path_rate,
                dropout_rate=f.dropout_rate, head_init_std=f.head_init_std)


def build_model(config, rngs: nnx.Rngs) -> VideoClassifier:
    return VideoClassifier(rngs=rngs, **classifier_kwargs(config))


def probe_scales(params) -> dict:
    """lr multipliers for a linear probe: 1 for finetune_step.PROBE_TRAINABLE, 0 for the frozen encoder."""
    return {k: jax.tree.map(lambda _, one=float(k in finetune_step.PROBE_TRAINABLE): np.float32(one), v)
            for k, v in params.items()}


def evaluate(eval_step, params, source, config, batch_shardings) -> dict:
    """eval_top1 / eval_top5 / eval_loss over every video of `source` (one clip each)."""
    totals = None
    for host_batch in validation.eval_batches(source, config, config_lib.eval_batch_size(config),
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count()):
        sums = eval_step(params, pipeline.to_global(host_batch, batch_shardings))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)
    n = max(float(totals["count"]), 1.0)
    out = {f"eval_{k}": float(totals[k]) / n for k in ("top1", "top5", "loss")}
    out["eval_skipped"] = len(source) - int(totals["count"])  # unreadable videos
    return out


def train(config, workdir: str) -> dict:
    """Run (or resume) fine-tuning in `workdir`; returns the last logged train and eval metrics."""
    return run(config, workdir).metrics


def run(config, workdir: str) -> loop.Outcome:
    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = shd.make_mesh(config.mesh)
    total = config_lib.total_steps(config)
    model_fn = lambda rngs: build_model(config, rngs)
    abstract_params = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: model_fn(nnx.Rngs(params=config.seed))),
                                                 nnx.Param)[1])
    lr_scales = None
    if config.finetune.layer_decay < 1.0:
        lr_scales = optim.layer_decay_scales(abstract_params, config.model.depth, config.finetune.layer_decay)
    if config.finetune.linear_probe:  # only the final norm and the head move (weight decay included)
        lr_scales = probe_scales(abstract_params)
    tx, schedule = optim.make_optimizer(config, config_lib.schedule_steps(config), config_lib.warmup_steps(config),
                                        lr_scales=lr_scales)

    def init_params():  # only for a fresh workdir: a resumed run restores its own params
        logging.info("Initialising the encoder from %s", config.init_from)
        encoder = warm_start.load_encoder_params(config.init_from, abstract_params, config.model,
                                                 interpolate=config.finetune.interpolate_pos_embed)
        fresh_head = jax.jit(lambda: nnx.to_pure_dict(nnx.split(model_fn(nnx.Rngs(params=config.seed)),
                                                                nnx.Param)[1])["head"])()
        return dict(encoder, head=jax.device_get(fresh_head))

    eval_source = validation.make_eval_source(config)
    eval_sh = finetune_step.eval_batch_shardings(mesh)
    steps = {}

    def make_train_step(graphdef, state_sh):
        steps["eval"] = finetune_step.make_eval_step(graphdef, mesh, config, state_sh["params"])
        return finetune_step.make_train_step(graphdef, tx, schedule, mesh, config, state_sh)

    def after_step(done, state):
        every = config.eval_every_steps
        if eval_source is None or not ((every and done % every == 0) or done == total):
            return None
        return evaluate(steps["eval"], state["params"], eval_source, config, eval_sh)

    logging.info("Validating on %d held-out videos", len(eval_source) if eval_source else 0)
    return loop.run(
        config, workdir, mesh=mesh, model_fn=model_fn, tx=tx, make_train_step=make_train_step,
        batch_shardings={"video": shd.batch_sharding(mesh, 6), "label": shd.batch_sharding(mesh, 2)},
        model_json=dict(kind="classifier", **classifier_kwargs(config)),  # what from_torch --export reads
        init_params=init_params if config.init_from else None, after_step=after_step, name="Fine-tuning")
