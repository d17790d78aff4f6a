"""Token masks for MAE-ST: random (the method) and the paper's tube / frame / block ablations.

Every strategy is expressed as a noise array [B, L] over the time-major token grid; the
kept tokens are the `num_visible` smallest entries of the noise (a stable argsort, exactly
as the reference's `random_masking`). A caller that passes its own noise reproduces a mask.
"""

import math

import jax
import jax.numpy as jnp

STRATEGIES = ("random", "tube", "frame", "block")


def num_visible(strategy: str, grid: tuple[int, int, int], mask_ratio: float) -> int:
    """Number of kept tokens for a token grid (T', H', W') and a mask ratio."""
    t, h, w = grid
    keep = 1.0 - mask_ratio
    if strategy in ("random", "block"):
        n = int(t * h * w * keep)  # same expression as the reference: int(L * (1 - r))
    elif strategy == "tube":
        n = t * int(h * w * keep)  # one spatial mask shared by all time steps
    elif strategy == "frame":
        n = int(t * keep) * h * w  # whole time steps
    else:
        raise ValueError(f"mask_strategy={strategy!r}: choose one of {STRATEGIES}")
    if n < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} with mask_strategy={strategy!r} keeps no token of the "
            f"{t}x{h}x{w} grid: lower mask_ratio")
    return n


def make_noise(key: jax.Array, strategy: str, batch: int, grid: tuple[int, int, int],
               block_size: tuple[int, int, int] = (2, 2, 2)) -> jax.Array:
    """Noise [B, L] whose ascending order ranks the tokens to keep for a strategy."""
    t, h, w = grid
    if strategy == "random":
        return jax.random.uniform(key, (batch, t * h * w))
    if strategy == "tube":  # equal over time: the stable argsort keeps whole tubes
        spatial = jax.random.uniform(key, (batch, 1, h * w))
        return jnp.broadcast_to(spatial, (batch, t, h * w)).reshape(batch, -1)
    if strategy == "frame":  # equal within a time step: keeps whole frames
        temporal = jax.random.uniform(key, (batch, t, 1))
        return jnp.broadcast_to(temporal, (batch, t, h * w)).reshape(batch, -1)
    if strategy == "block":
        bt, bh, bw = block_size
        ct, ch, cw = math.ceil(t / bt), math.ceil(h / bh), math.ceil(w / bw)
        k_cube, k_fine = jax.random.split(key)
        cube = jax.random.uniform(k_cube, (batch, ct * ch * cw))
        cube_rank = jnp.argsort(jnp.argsort(cube, axis=1), axis=1).astype(jnp.float32)
        cube_rank = cube_rank.reshape(batch, ct, 1, ch, 1, cw, 1)
        cube_rank = jnp.broadcast_to(cube_rank, (batch, ct, bt, ch, bh, cw, bw))
        cube_rank = cube_rank.reshape(batch, ct * bt, ch * bh, cw * bw)[:, :t, :h, :w]
        # whole cubes first (by rank), random order inside the one cube that is cut
        fine = jax.random.uniform(k_fine, (batch, t, h, w))
        return ((cube_rank + fine) / (ct * ch * cw)).reshape(batch, -1)
    raise ValueError(f"mask_strategy={strategy!r}: choose one of {STRATEGIES}")


def masking_from_noise(noise: jax.Array, n_visible: int):
    """ids_keep [B, K], ids_restore [B, L], mask [B, L] (1 = removed) from noise [B, L]."""
    ids_shuffle = jnp.argsort(noise, axis=1, stable=True)
    ids_restore = jnp.argsort(ids_shuffle, axis=1, stable=True)
    ids_keep = ids_shuffle[:, :n_visible]
    batch, length = noise.shape
    mask_shuffled = jnp.concatenate(
        [jnp.zeros((batch, n_visible), jnp.float32),
         jnp.ones((batch, length - n_visible), jnp.float32)], axis=1)
    mask = jnp.take_along_axis(mask_shuffled, ids_restore, axis=1)
    return ids_keep, ids_restore, mask
