"""Jitted fine-tuning steps: train (Mixup/CutMix, classifier, soft-target loss, AdamW) and eval (padded batches)."""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mae_st_jax.train import erasing, mixup, sharding as shd, step as step_lib

PROBE_TRAINABLE = ("norm", "head")  # what a linear probe trains: the final norm and the linear head


def make_train_step(graphdef, tx, schedule, mesh, config, state_shardings):
    """jit(step)(state, batch) -> (state, metrics); batch: 'video' uint8 [A, B/A, T, H, W, C], 'label' [A, B/A]."""
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    f = config.finetune
    mix = functools.partial(mixup.mix_batch, num_classes=config.data.num_classes, mixup_alpha=f.mixup_alpha,
                            cutmix_alpha=f.cutmix_alpha, prob=f.mixup_prob, switch_prob=f.switch_prob,
                            label_smoothing=f.label_smoothing)
    micro_sharding = NamedSharding(mesh, P(shd.BATCH_AXES))
    seed = config.seed

    probe = bool(f.get("linear_probe", False))
    reprob = 0.0 if probe else float(f.get("reprob", 0.0))  # a probe sees clean features (no erasing)

    def loss_fn(params, batch, key):  # one micro-batch; its own erase, mix and drop-path/dropout keys
        key_erase, key_mix, key_model = jax.random.split(key, 3)
        if probe:  # frozen encoder: no gradient (and no backward pass) through it
            params = {k: v if k in PROBE_TRAINABLE else jax.lax.stop_gradient(v) for k, v in params.items()}
        model = nnx.merge(graphdef, params)
        video = jax.lax.with_sharding_constraint(step_lib.normalize(batch["video"], mean, std), micro_sharding)
        video = erasing.random_erase(key_erase, video, reprob)  # after the crop, before the mix (mae_st)
        video, targets, _, _ = mix(key_mix, video, batch["label"])
        logits = model(video, key=key_model, deterministic=False)
        return mixup.soft_target_cross_entropy(logits, targets)

    def step(state, batch):
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        micro_batches = {"video": batch["video"], "label": batch["label"]}
        loss, grads = step_lib.accumulate_gradients(loss_fn, state["params"], micro_batches, key)
        loss, grads = step_lib.inject_nan(config, state, loss, grads)
        return step_lib.apply_gradients(state, loss, grads, tx, schedule, config.skip_nonfinite)

    batch_sh = {"video": shd.batch_sharding(mesh, 6), "label": shd.batch_sharding(mesh, 2)}
    return jax.jit(step, in_shardings=(state_shardings, batch_sh),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))


def eval_batch_shardings(mesh) -> dict:
    """Eval batches are [b, ...] (no accumulation axis), split over data x fsdp."""
    split = functools.partial(shd.leading_batch_sharding, mesh)
    return {"video": split(5), "label": split(1), "valid": split(1)}


def make_eval_step(graphdef, mesh, config, params_shardings):
    """jit(step)(params, batch) -> sums {'count', 'loss', 'top1', 'top5'} over batch['valid'] entries."""
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    k = min(5, config.data.num_classes)

    def step(params, batch):
        model = nnx.merge(graphdef, params)
        logits = model(step_lib.normalize(batch["video"], mean, std), deterministic=True)  # [b, K] fp32
        labels, valid = batch["label"], batch["valid"].astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=1)[:, 0]
        top = jax.lax.top_k(logits, k)[1]  # [b, k] class ids, best first
        hits = top == labels[:, None]
        return {"count": valid.sum(), "loss": (nll * valid).sum(),
                "top1": (hits[:, 0] * valid).sum(), "top5": (hits.any(axis=1) * valid).sum()}

    return jax.jit(step, in_shardings=(params_shardings, eval_batch_shardings(mesh)),
                   out_shardings=shd.replicated(mesh))
