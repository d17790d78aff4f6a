"""Start a classifier from pre-trained weights: keep the encoder's params, resize pos-embeds, check shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mae_st_jax.models.mae import token_grid
from mae_st_jax.train import checkpoint, step as step_lib


def is_encoder_param(name: str) -> bool:
    """False for the MAE decoder (decoder_*), its mask token and a classifier head."""
    return not (name.startswith("decoder_") or name in ("mask_token", "head"))


def _grid_from_shapes(params) -> tuple[int, int, int] | None:
    """(T', H', W') read off separable pos tables (square spatial grid); None for a joint table."""
    if "pos_embed_spatial" not in params or "pos_embed_temporal" not in params:
        return None
    side = math.isqrt(params["pos_embed_spatial"].shape[1])
    return params["pos_embed_temporal"].shape[1], side, side


def _resize(table, new_shape, spatial_method: str):
    """[t, h, w, E] -> [*new_shape, E]: spatial (h, w) with `spatial_method`, then temporal t linearly."""
    t, h, w, e = table.shape
    x = jnp.asarray(table, jnp.float32)
    if (h, w) != tuple(new_shape[1:3]):
        x = jax.image.resize(x, (t, *new_shape[1:3], e), spatial_method, antialias=False)
    if t != new_shape[0]:
        x = jax.image.resize(x, (*new_shape, e), "linear", antialias=False)
    return np.asarray(x).astype(table.dtype)


def interpolate_pos_embed(params: dict, old_grid, new_grid, spatial_method: str = "cubic") -> dict:
    """The encoder's position tables resized from token grid old_grid (T', H', W') to new_grid.

    Spatial: bicubic ('cubic') or 'linear' over H' x W'; temporal: linear over T'. jax.image.resize
    with half-pixel centres and no antialiasing, like torch's align_corners=False (its bicubic uses
    a = -0.75, ours Keys' a = -0.5). Class position and cls token untouched; identity when grids match.
    """
    (t0, h0, w0), (t1, h1, w1) = tuple(old_grid), tuple(new_grid)
    if (t0, h0, w0) == (t1, h1, w1):
        return params
    out = dict(params)

    def check(name, n):
        if params[name].shape[1] != n:
            raise ValueError(f"{name} has {params[name].shape[1]} tokens, not the {n} of grid {tuple(old_grid)}")

    if "pos_embed_spatial" in params:  # [1, H'W', E]
        check("pos_embed_spatial", h0 * w0)
        table = params["pos_embed_spatial"].reshape(1, h0, w0, -1)
        out["pos_embed_spatial"] = _resize(table, (1, h1, w1), spatial_method).reshape(1, h1 * w1, -1)
    if "pos_embed_temporal" in params:  # [1, T', E]
        check("pos_embed_temporal", t0)
        table = params["pos_embed_temporal"].reshape(t0, 1, 1, -1)
        out["pos_embed_temporal"] = _resize(table, (t1, 1, 1), spatial_method).reshape(1, t1, -1)
    if "pos_embed" in params:  # joint [1, (1 +) T'H'W', E]
        table = params["pos_embed"]
        num_cls = table.shape[1] - t0 * h0 * w0
        if num_cls not in (0, 1):
            raise ValueError(f"pos_embed has {table.shape[1]} tokens, not {t0 * h0 * w0} (+1) of grid {old_grid}")
        grid = _resize(table[0, num_cls:].reshape(t0, h0, w0, -1), (t1, h1, w1), spatial_method)
        out["pos_embed"] = np.concatenate([table[:, :num_cls], grid.reshape(1, t1 * h1 * w1, -1)], axis=1)
    return out


def load_encoder_params(init_from: str, expected_params, model_config, *, interpolate: bool = True) -> dict:
    """Host params for a VideoClassifier's encoder from `init_from` (a pre-training or fine-tuning
    workdir of ours, or a converted PyTorch directory): decoder, mask token and head dropped,
    pos-embeds resized when the token grids differ (`interpolate`). `expected_params`: the
    classifier's (abstract) params. Raises ValueError listing every missing or mis-shaped parameter."""
    params, ckpt_config = checkpoint.load_params(init_from)
    encoder = {k: v for k, v in params.items() if is_encoder_param(k)}
    dropped = sorted(set(params) - set(encoder))
    if dropped:
        logging.info("init_from %s: not loading %s (the classifier's head starts fresh)", init_from, dropped)
    old_grid = token_grid(ckpt_config) or _grid_from_shapes(encoder)
    new_grid = token_grid(model_config)
    if interpolate and old_grid is not None and tuple(old_grid) != tuple(new_grid):
        logging.warning("init_from %s: resizing position embeddings from token grid %s to %s",
                        init_from, tuple(old_grid), tuple(new_grid))
        encoder = interpolate_pos_embed(encoder, old_grid, new_grid)
    step_lib.check_params_match(encoder, {k: v for k, v in expected_params.items() if is_encoder_param(k)})
    return encoder
