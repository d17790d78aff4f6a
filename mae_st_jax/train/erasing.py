"""Random erasing for video clips on device (timm/PySlowFast RandomErasing, mode 'pixel', one box, cube).

Applied inside the jitted fine-tuning step to the normalised clips, after the crop and before Mixup/CutMix
(mae_st's order). Per clip: with probability `prob`, up to 100 tries (TRIES) for a box of area U[min_area, max_area]
of the frame and log-uniform aspect in [min_aspect, 1 / min_aspect]; the first box that fits (h < H and
w < W) is filled on every frame with N(0, 1) noise (fresh per pixel, channel and frame); no box fits ->
the clip is unchanged. The box is the same for all frames of a clip.
"""

import math

import jax
import jax.numpy as jnp

TRIES = 100  # the reference's cube mode (_erase_cube) tries 100 boxes (its per-image mode 10)


def erase_boxes(key: jax.Array, batch: int, height: int, width: int, prob: float, min_area: float = 0.02,
                max_area: float = 1 / 3, min_aspect: float = 0.3):
    """(apply [B] bool, top [B], left [B], h [B], w [B]) int32: the box of each clip (apply=False: none)."""
    k_on, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
    on = jax.random.uniform(k_on, (batch,)) < prob
    area = jax.random.uniform(k_area, (batch, TRIES), minval=min_area, maxval=max_area) * (height * width)
    log_aspect = jax.random.uniform(k_aspect, (batch, TRIES), minval=math.log(min_aspect),
                                    maxval=math.log(1 / min_aspect))
    aspect = jnp.exp(log_aspect)
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    first = jnp.argmax(fits, axis=1)  # the first try that fits (0 when none does; `found` then False)
    found = fits.any(axis=1)
    h = jnp.take_along_axis(h, first[:, None], axis=1)[:, 0]
    w = jnp.take_along_axis(w, first[:, None], axis=1)[:, 0]
    # top uniform in [0, height - h] (inclusive, as random.randint)
    top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - w + 1)).astype(jnp.int32)
    return on & found, top, left, h, w


def box_mask(apply, top, left, h, w, height: int, width: int) -> jax.Array:
    """bool [B, H, W]: the pixels each clip's box covers (all False where apply is False)."""
    rows = jnp.arange(height)[None, :]
    cols = jnp.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    return apply[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]


def random_erase(key: jax.Array, video: jax.Array, prob: float, **box_kwargs) -> jax.Array:
    """video [B, T, H, W, C] (normalised) with one N(0, 1)-filled box per selected clip, same on all frames."""
    if prob <= 0:
        return video
    b, _, height, width, _ = video.shape
    k_box, k_noise = jax.random.split(key)
    mask = box_mask(*erase_boxes(k_box, b, height, width, prob, **box_kwargs), height, width)
    noise = jax.random.normal(k_noise, video.shape, jnp.float32).astype(video.dtype)
    return jnp.where(mask[:, None, :, :, None], noise, video)
