"""Start a classifier from pre-trained weights: keep the encoder's params, resize pos-embeds, check shapes."""

import math

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


def torch_resize_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
    """float32 [n_out, n_in]: torch.nn.functional.interpolate(mode='bicubic' | 'linear',
    align_corners=False) along one axis as a matrix, its weights computed in float32 as torch's CPU
    kernels do. Output i reads input position (i + 0.5) * n_in / n_out - 0.5; bicubic: Keys' kernel with
    a = -0.75 (torch's) over the 4 nearest inputs, indices clamped to the edge (the edge value repeated);
    linear: the position clamped at 0, the 2 nearest inputs."""
    f = np.float32
    scale, half, a = f(n_in) / f(n_out), f(0.5), f(-0.75)
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    out = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        x = scale * (f(i) + half) - half
        if method == "cubic":
            x0 = int(np.floor(x))
            t = min(max(x - f(x0), f(0)), f(1))
            weights = (far(t + f(1)), near(t), near(f(1) - t), far(f(1) - t + f(1)))
            for k, wk in zip(range(x0 - 1, x0 + 3), weights):
                out[i, min(max(k, 0), n_in - 1)] += wk
        elif method == "linear":
            x = max(x, f(0))
            x0 = int(x)
            x1 = x0 + (1 if x0 < n_in - 1 else 0)
            t = min(max(x - f(x0), f(0)), f(1))
            out[i, x0] += f(1) - t
            out[i, x1] += t
        else:
            raise ValueError(f"resize method {method!r}: choose 'cubic' or 'linear'")
    return out


def _resize(table, new_shape, spatial_method: str):
    """[t, h, w, E] -> [*new_shape, E]: spatial (h, w) with `spatial_method`, then temporal t linearly,
    each as torch's interpolate(align_corners=False) does it (in float32)."""
    t, h, w, e = table.shape
    x = np.asarray(table, np.float32)
    if (h, w) != tuple(new_shape[1:3]):
        rows = torch_resize_matrix(h, new_shape[1], spatial_method)
        cols = torch_resize_matrix(w, new_shape[2], spatial_method)
        x = np.einsum("ih,thwe->tiwe", rows, x)
        x = np.einsum("jw,tiwe->tije", cols, x)
    if t != new_shape[0]:
        x = np.einsum("st,thwe->shwe", torch_resize_matrix(t, new_shape[0], "linear"), x)
    return x.astype(table.dtype)


def interpolate_pos_embed(params: dict, old_grid, new_grid, spatial_method: str = "cubic") -> dict:
    """The encoder's position tables resized from token grid old_grid (T', H', W') to new_grid.

    Spatial: bicubic ('cubic') or 'linear' over H' x W'; temporal: linear over T'; both as torch's
    interpolate(align_corners=False) (mae_st's interpolate_pos_embed resizes a joint table spatially
    with its bicubic), to float32 rounding. Class position and cls token untouched; identity when grids match.
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
    step_lib.check_saved_settings(ckpt_config, model_config, init_from)
    return encoder
