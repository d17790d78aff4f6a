"""Tests for temporal clip sampling (mae_st_jax.data.sampling)."""

import numpy as np
import pytest

from mae_st_jax.data import sampling as S


def test_clip_span():
    assert S.clip_span(16, 4, 30.0) == 64.0
    assert S.clip_span(16, 4, 15.0) == 32.0
    assert S.clip_span(16, 4, 25.0) == pytest.approx(160 / 3)
    assert S.clip_span(8, 8, 60.0, target_fps=30.0) == 128.0


def test_start_index_no_slack_is_zero():
    rng = np.random.default_rng(0)
    assert S.start_index(50, 64.0, -1, 1, rng) == 0.0
    assert S.start_index(64, 64.0, -1, 1, rng) == 0.0
    for i in range(3):
        assert S.start_index(50, 64.0, i, 3, None) == 0.0


def test_start_index_uniform_test_clips():
    # delta = 300 - 64 = 236
    assert S.start_index(300, 64.0, 0, 1, None) == 118
    assert [S.start_index(300, 64.0, i, 3, None) for i in range(3)] == [0, 118, 236]
    # delta = 237: floor(237 / 2) = 118 for both the centre clip and the 3-clip step
    assert S.start_index(301, 64.0, 0, 1, None) == 118
    assert [S.start_index(301, 64.0, i, 3, None) for i in range(3)] == [0, 118, 236]
    # delta = 239: floor (not round) of 119.5
    assert S.start_index(303, 64.0, 0, 1, None) == 119
    assert [S.start_index(303, 64.0, i, 3, None) for i in range(3)] == [0, 119, 238]
    assert [S.start_index(303, 64.0, i, 4, None) for i in range(4)] == [0, 79, 158, 237]
    # fractional span (25 fps): delta = 100 - 53.33 = 46.67 -> floor(23.33) = 23
    span = S.clip_span(16, 4, 25.0)
    assert S.start_index(100, span, 0, 1, None) == 23
    assert [S.start_index(100, span, i, 3, None) for i in range(3)] == [0, 23, 46]


def test_start_index_training_is_uniform_in_slack():
    starts = [S.start_index(100, 64.0, -1, 1, np.random.default_rng(s)) for s in range(500)]
    assert 0 <= min(starts) < 2 and 34 < max(starts) <= 36
    assert starts[7] == np.random.default_rng(7).uniform(0, 36)


def test_linspace_is_bit_equal_to_torch():
    import torch  # a test dependency (setup.py's test extra): no skip
    rng = np.random.default_rng(0)
    for trial in range(20000):
        n = int(rng.choice([1, 2, 3, 8, 16, 32, 64]))
        start = float(rng.uniform(0, 3000)) if trial % 2 else float(rng.integers(0, 3000))
        end = start + float(rng.choice([n * rng.integers(1, 9), rng.uniform(1, 300)])) - 1
        ours = S.torch_linspace_f32(start, end, n)
        assert ours.dtype == np.float32
        assert np.array_equal(ours, torch.linspace(start, end, n).numpy()), (start, end, n)
    # a clip (8 frames at rate 4 of a 25 fps video) where float64 np.linspace put frame 255, the reference 254
    span = S.clip_span(8, 4, 25.0)
    assert np.linspace(233.0, 233.0 + span - 1, 8).astype(int)[6] == 255
    assert S.frame_indices(233.0, span, 8, 1000)[6] == torch.linspace(233.0, 233.0 + span - 1, 8).long()[6] == 254


def test_frame_indices_hand_example():
    # linspace(0, 63, 16) has step 4.2; values are truncated toward zero
    got = S.frame_indices(0.0, 64.0, 16, 300)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, [0, 4, 8, 12, 16, 21, 25, 29, 33, 37, 42, 46, 50, 54, 58, 63])
    # exact multiples: linspace(0, 60, 16) -> 0, 4, ..., 60
    np.testing.assert_array_equal(S.frame_indices(0.0, 61.0, 16, 300), np.arange(0, 61, 4))


def test_frame_indices_truncation():
    # linspace(10.7, 17.7, 4) = 10.7, 13.03, 15.37, 17.7
    np.testing.assert_array_equal(S.frame_indices(10.7, 8.0, 4, 100), [10, 13, 15, 17])
    # the clamp bound video_len - 1 is applied before truncation
    np.testing.assert_array_equal(S.frame_indices(90.5, 20.0, 3, 100), [90, 99, 99])


def test_clamping_clip_longer_than_video():
    for idx in (S.frame_indices(0.0, 64.0, 16, 10), S.test_clip(0, 1, 10, 16, 4, 30.0),
                S.train_clip(np.random.default_rng(3), 10, 16, 4, 30.0)):
        assert idx.min() >= 0 and idx.max() <= 9
        assert np.all(np.diff(idx) >= 0)
        assert idx[0] == 0 and idx[-1] == 9
        assert len(idx) == 16


def test_train_clip_deterministic_and_in_range():
    a = S.train_clip(np.random.default_rng(42), 300, 16, 4, 30.0)
    b = S.train_clip(np.random.default_rng(42), 300, 16, 4, 30.0)
    np.testing.assert_array_equal(a, b)
    start = np.random.default_rng(42).uniform(0, 236)
    np.testing.assert_array_equal(a, S.frame_indices(start, 64.0, 16, 300))
    rng = np.random.default_rng(0)
    firsts = []
    for _ in range(2000):
        idx = S.train_clip(rng, 300, 16, 4, 30.0)
        assert len(idx) == 16 and idx.min() >= 0 and idx.max() <= 299
        assert np.all(np.diff(idx) >= 4) and idx[-1] - idx[0] == 63
        firsts.append(idx[0])
    assert min(firsts) <= 2 and max(firsts) >= 233


def test_test_clips_cover_video():
    clips = [S.test_clip(i, 3, 300, 16, 4, 30.0) for i in range(3)]
    assert [c[0] for c in clips] == [0, 118, 236]
    assert clips[-1][-1] == 299
    # source at 60 fps: the clip spans 128 source frames, linspace(0, 127, 16) has step 8.47
    np.testing.assert_array_equal(S.test_clip(0, 1, 128, 16, 4, 60.0),
                                  [0, 8, 16, 25, 33, 42, 50, 59, 67, 76, 84, 93, 101, 110, 118, 127])


def test_target_frame_selection():
    np.testing.assert_array_equal(S.linspace_frames(16, 8), [0, 2, 4, 6, 8, 10, 12, 15])
    np.testing.assert_array_equal(S.stride_frames(16, 8), [0, 2, 4, 6, 8, 10, 12, 14])
    np.testing.assert_array_equal(S.linspace_frames(16, 16), np.arange(16))
    np.testing.assert_array_equal(S.stride_frames(16, 4), [0, 4, 8, 12])


@pytest.mark.parametrize("call", [
    lambda: S.clip_span(0, 4, 30.0),
    lambda: S.clip_span(16, 0, 30.0),
    lambda: S.clip_span(16, 4, 0.0),
    lambda: S.clip_span(16, 4, 30.0, target_fps=-1.0),
    lambda: S.start_index(0, 64.0, 0, 1, None),
    lambda: S.start_index(100, 64.0, 3, 3, None),
    lambda: S.start_index(100, 64.0, -2, 3, None),
    lambda: S.start_index(100, 64.0, -1, 1, None),
    lambda: S.frame_indices(0.0, 64.0, 0, 100),
    lambda: S.frame_indices(0.0, 64.0, 16, 0),
    lambda: S.train_clip(np.random.default_rng(0), 0, 16, 4, 30.0),
    lambda: S.test_clip(-1, 3, 100, 16, 4, 30.0),
    lambda: S.test_clip(1, 1, 100, 16, 4, 30.0),
    lambda: S.linspace_frames(8, 16),
    lambda: S.stride_frames(8, 16),
    lambda: S.stride_frames(16, 6),
])
def test_errors(call):
    with pytest.raises(ValueError):
        call()
