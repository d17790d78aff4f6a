"""Tests for token masking (mae_st_jax.masking): counts, index bookkeeping and each strategy's shape."""

import functools
import itertools

import jax
import numpy as np
import pytest

from mae_st_jax import masking

GRIDS = [(4, 6, 6), (8, 14, 14)]  # for the num_visible formulas (pure Python)
RATIOS = [0.5, 0.75, 0.9]
# Each new noise shape / (shape, num_visible) pair costs XLA:CPU compiles (a 4-D threefry
# uniform for 'block' takes 1-3 s): the array tests run on (4, 6, 6), plus the reference's
# (8, 14, 14) at 90% for random masking.
GRID = (4, 6, 6)


def expected_visible(strategy, grid, ratio):
    t, h, w = grid
    keep = 1.0 - ratio
    if strategy in ("random", "block"):
        return int(t * h * w * keep)
    if strategy == "tube":
        return t * int(h * w * keep)
    if strategy == "frame":
        return int(t * keep) * h * w
    raise AssertionError(strategy)


def valid_cases():
    """(strategy, grid, ratio) triples that keep at least one token."""
    for s, r in itertools.product(masking.STRATEGIES, RATIOS):
        if expected_visible(s, GRID, r) >= 1:
            yield s, GRID, r
    yield "random", (8, 14, 14), 0.9


CASES = list(valid_cases())


BATCH = 4


@functools.lru_cache(maxsize=None)
def noise_of(strategy, grid, batch, seed, block_size):
    """make_noise, computed once per setting (jax.random compiles per shape: keep the set small)."""
    return np.asarray(masking.make_noise(jax.random.key(seed), strategy, batch, grid, block_size))


@functools.lru_cache(maxsize=None)
def mask_of(strategy, grid, ratio, batch=BATCH, seed=0, block_size=(2, 2, 2)):
    """(noise, num_visible, ids_keep, ids_restore, mask) as numpy; callers must not modify them."""
    noise = noise_of(strategy, grid, batch, seed, block_size)
    n = masking.num_visible(strategy, grid, ratio)
    ids_keep, ids_restore, mask = masking.masking_from_noise(noise, n)
    return noise, n, np.asarray(ids_keep), np.asarray(ids_restore), np.asarray(mask)


def test_strategies_listed():
    assert set(masking.STRATEGIES) == {"random", "tube", "frame", "block"}


@pytest.mark.parametrize("strategy", masking.STRATEGIES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_num_visible_formula(strategy, grid, ratio):
    want = expected_visible(strategy, grid, ratio)
    if want < 1:
        with pytest.raises(ValueError):
            masking.num_visible(strategy, grid, ratio)
    else:
        assert masking.num_visible(strategy, grid, ratio) == want


def test_num_visible_known_values():
    # the reference: 1568 tokens at 90% keep int(1568 * 0.1) = 156
    assert masking.num_visible("random", (8, 14, 14), 0.9) == 156
    assert masking.num_visible("block", (8, 14, 14), 0.9) == 156
    assert masking.num_visible("random", (8, 14, 14), 0.75) == 392
    assert masking.num_visible("random", (8, 14, 14), 0.5) == 784
    assert masking.num_visible("tube", (8, 14, 14), 0.9) == 8 * 19  # int(196 * 0.1) = 19
    assert masking.num_visible("tube", (8, 14, 14), 0.75) == 8 * 49
    assert masking.num_visible("frame", (8, 14, 14), 0.75) == 2 * 196
    assert masking.num_visible("frame", (8, 14, 14), 0.5) == 4 * 196
    assert masking.num_visible("random", (4, 6, 6), 0.9) == 14  # int(14.4)


def test_ratio_that_keeps_nothing_raises():
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.num_visible("frame", (8, 14, 14), 0.9)  # int(8 * 0.1) = 0 frames
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.num_visible("random", (4, 6, 6), 0.999)
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.num_visible("tube", (4, 2, 2), 0.9)
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.num_visible("random", (4, 6, 6), 1.0)


def test_unknown_strategy_raises():
    with pytest.raises(ValueError, match="mask_strategy"):
        masking.num_visible("checkerboard", (4, 6, 6), 0.75)
    with pytest.raises(ValueError, match="mask_strategy"):
        masking.make_noise(jax.random.key(0), "checkerboard", 2, (4, 6, 6))


@pytest.mark.parametrize("strategy,grid,ratio", CASES)
def test_masking_bookkeeping(strategy, grid, ratio):
    batch = BATCH
    noise, n, ids_keep, ids_restore, mask = mask_of(strategy, grid, ratio)
    length = int(np.prod(grid))
    assert noise.shape == (batch, length)
    assert ids_keep.shape == (batch, n)
    assert ids_restore.shape == (batch, length)
    assert mask.shape == (batch, length)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    # exactly n_visible kept (0) per row
    np.testing.assert_array_equal((mask == 0).sum(axis=1), np.full(batch, n))
    ids_shuffle = np.argsort(noise, axis=1, kind="stable")
    np.testing.assert_array_equal(ids_keep, ids_shuffle[:, :n])
    # ids_restore inverts ids_shuffle
    np.testing.assert_array_equal(np.take_along_axis(ids_shuffle, ids_restore, axis=1),
                                  np.broadcast_to(np.arange(length), (batch, length)))
    np.testing.assert_array_equal(np.take_along_axis(ids_restore, ids_shuffle, axis=1),
                                  np.broadcast_to(np.arange(length), (batch, length)))
    for b in range(batch):
        # ids_keep are exactly the unmasked positions, without repeats
        assert len(set(ids_keep[b].tolist())) == n
        assert set(ids_keep[b].tolist()) == set(np.flatnonzero(mask[b] == 0).tolist())
        # the kept tokens are the smallest-noise ones
        assert noise[b][mask[b] == 0].max() <= noise[b][mask[b] == 1].min()


@pytest.mark.parametrize("strategy", masking.STRATEGIES)
def test_same_noise_same_mask(strategy):
    grid, ratio = (4, 6, 6), 0.75
    noise = masking.make_noise(jax.random.key(0), strategy, BATCH, grid)
    noise2 = masking.make_noise(jax.random.key(0), strategy, BATCH, grid)
    np.testing.assert_array_equal(np.asarray(noise), np.asarray(noise2))
    n = masking.num_visible(strategy, grid, ratio)
    a = masking.masking_from_noise(noise, n)
    b = masking.masking_from_noise(np.asarray(noise).copy(), n)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_hand_made_noise():
    noise = np.array([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2]], np.float32)
    ids_keep, ids_restore, mask = masking.masking_from_noise(noise, 2)
    np.testing.assert_array_equal(np.asarray(ids_keep), [[1, 5]])
    np.testing.assert_array_equal(np.asarray(mask), [[1, 0, 1, 1, 1, 0]])
    # argsort of the noise: [1, 5, 3, 0, 4, 2]; its inverse
    np.testing.assert_array_equal(np.asarray(ids_restore), [[3, 0, 5, 2, 4, 1]])


@pytest.mark.parametrize("grid", [GRID])
@pytest.mark.parametrize("ratio", RATIOS)
def test_tube_mask_same_for_every_time_step(grid, ratio):
    t, h, w = grid
    _, n, _, _, mask = mask_of("tube", grid, ratio)
    mask = mask.reshape(BATCH, t, h * w)
    np.testing.assert_array_equal(mask, np.broadcast_to(mask[:, :1], mask.shape))
    np.testing.assert_array_equal((mask[:, 0] == 0).sum(axis=1), np.full(BATCH, n // t))
    # differs across the batch
    assert not np.array_equal(mask[0, 0], mask[1, 0])


@pytest.mark.parametrize("grid", [GRID])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_frame_mask_whole_time_steps(grid, ratio):
    t, h, w = grid
    _, n, _, _, mask = mask_of("frame", grid, ratio)
    mask = mask.reshape(BATCH, t, h * w)
    per_step = mask.mean(axis=2)
    assert set(np.unique(per_step)) <= {0.0, 1.0}
    np.testing.assert_array_equal((per_step == 0).sum(axis=1), np.full(BATCH, n // (h * w)))


@pytest.mark.parametrize("grid", [GRID])
@pytest.mark.parametrize("ratio", RATIOS)
def test_block_mask_constant_within_cubes(grid, ratio):
    t, h, w = grid
    batch = BATCH
    _, n, _, _, mask = mask_of("block", grid, ratio, block_size=(2, 2, 2))
    cubes = mask.reshape(batch, t // 2, 2, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4, 6)
    cubes = cubes.reshape(batch, -1, 8)
    mixed = (cubes.min(axis=2) != cubes.max(axis=2)).sum(axis=1)
    assert (mixed <= 1).all(), mixed
    # a whole number of cubes kept -> no cube is cut
    if n % 8 == 0:
        assert (mixed == 0).all(), mixed
    else:
        assert (mixed == 1).all(), mixed
    np.testing.assert_array_equal((mask == 0).sum(axis=1), np.full(batch, n))


def mixed_cubes(mask, grid, block_size):
    """Per row, the number of cubes (block_size, clipped at the grid's edge) that are partly kept."""
    t, h, w = grid
    bt, bh, bw = block_size
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    cube = ((tt // bt) * 100 + (hh // bh)) * 100 + ww // bw  # cube id of each token, time-major
    cube = cube.reshape(-1)
    return np.array([sum(len(set(row[cube == c].tolist())) > 1 for c in np.unique(cube)) for row in mask])


@pytest.mark.parametrize("block_size", [(2, 3, 3), (3, 4, 4), (1, 2, 2)])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_block_mask_other_cube_sizes(block_size, ratio):
    # (3, 4, 4) does not divide the (4, 6, 6) grid: the edge cubes are smaller
    _, n, _, _, mask = mask_of("block", GRID, ratio, block_size=block_size)
    assert (mixed_cubes(mask, GRID, block_size) <= 1).all()
    np.testing.assert_array_equal((mask == 0).sum(axis=1), np.full(BATCH, n))
    # the check can fail: a random mask cuts many cubes
    _, _, _, _, random_mask = mask_of("random", GRID, ratio)
    assert (mixed_cubes(random_mask, GRID, block_size) > 1).all()


@pytest.mark.parametrize("strategy", masking.STRATEGIES)
def test_masks_differ_across_rows_and_keys(strategy):
    grid, ratio = (4, 6, 6), 0.5
    _, _, _, _, m0 = mask_of(strategy, grid, ratio, seed=0)
    _, _, _, _, m1 = mask_of(strategy, grid, ratio, seed=1)
    assert len({row.tobytes() for row in m0}) > 1
    assert not np.array_equal(m0, m1)


def test_random_mask_roughly_uniform():
    # tokens are masked uniformly: every time step loses about r of its tokens
    _, n, _, _, mask = mask_of("random", (8, 14, 14), 0.9)
    assert n == 156
    assert abs(mask.mean() - (1 - n / 1568)) < 1e-6
    rate = mask.reshape(BATCH, 8, 196).mean(axis=(0, 2))  # per time step, over 4 * 196 tokens
    assert np.abs(rate - 0.9).max() < 0.05
