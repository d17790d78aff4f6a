"""Optimiser pieces: learning-rate scaling and schedule, weight-decay mask, layer-wise lr decay, AdamW with clipping."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

NO_DECAY_LEAVES = ("bias", "scale")  # biases and LayerNorm parameters (the reference's 1-D params)
TOKEN_LEAVES = ("cls_token", "mask_token", "decoder_cls_token")


def effective_batch(config) -> int:
    """Clips per step as the reference counts them for lr scaling (pre-training ignores repeat_aug)."""
    if config.optim.lr_counts_repeat_aug:
        return config.batch_size
    return config.batch_size // config.data.repeat_aug


def peak_learning_rate(config) -> float:
    if config.optim.lr > 0:
        return config.optim.lr
    return config.optim.blr * effective_batch(config) / 256


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int, min_lr: float):
    """Per-step lr: linear from 0 over warmup_steps, then half-cosine to min_lr at total_steps."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * step / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        cos = min_lr + (peak - min_lr) * 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
        return jnp.where(step < warmup_steps, warm, cos)

    return schedule


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params, decay_tokens: bool = True):
    """True where AdamW applies weight decay: kernels, and (reference default) pos-embeds and tokens."""

    def rule(path, _):
        name = _leaf_name(path)
        if name in NO_DECAY_LEAVES:
            return False
        if name in TOKEN_LEAVES or "pos_embed" in name:
            return decay_tokens
        return True

    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(config, total_steps: int, warmup_steps: int, lr_scales=None):
    """(optax transform, schedule). `lr_scales`: optional per-parameter multipliers (layer decay)."""
    o = config.optim
    schedule = warmup_cosine(peak_learning_rate(config), warmup_steps, total_steps, o.min_lr)
    parts = []
    if o.clip_grad > 0:
        parts.append(optax.clip_by_global_norm(o.clip_grad))
    parts.append(optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps))
    parts.append(optax.add_decayed_weights(o.weight_decay, mask=lambda p: decay_mask(p, o.decay_tokens)))
    if lr_scales is not None:
        parts.append(_scale_by_tree(lr_scales))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule


def _scale_by_tree(scales):
    """Multiply each update by a fixed per-parameter scale (a tree like the params)."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


EMBED_LEAVES = ("patch_embed", "cls_token")  # layer 0 in layer-wise lr decay, with every pos_embed*


def layer_decay_scales(params, depth: int, decay: float):
    """Per-parameter lr multipliers decay ** (num_layers - layer_id), num_layers = depth + 1 (mae_st lrd).

    layer_id: 0 for the patch embedding, pos-embeds and cls token; i + 1 for block i (our blocks
    are stacked, so 'blocks/...' leaves get a [depth, 1, ...] array); num_layers for the rest
    (final norm, head): scale 1.
    """
    num_layers = depth + 1
    block_scales = decay ** (num_layers - (np.arange(depth) + 1.0))  # [depth]

    def rule(path, leaf):
        top = str(getattr(path[0], "key", getattr(path[0], "name", path[0])))
        if top == "blocks":
            if leaf.shape[0] != depth:
                raise ValueError(f"layer decay: {jax.tree_util.keystr(path)} stacks {leaf.shape[0]} blocks, "
                                 f"not depth={depth}")
            return block_scales.reshape((depth,) + (1,) * (len(leaf.shape) - 1)).astype(np.float32)
        if top in EMBED_LEAVES or top.startswith("pos_embed"):
            return np.float32(decay ** num_layers)
        return np.float32(1.0)

    return jax.tree_util.tree_map_with_path(rule, params)
