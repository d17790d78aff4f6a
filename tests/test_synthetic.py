"""Tests for the procedural synthetic video source (mae_st_jax.data.synthetic)."""

import numpy as np
import pytest

from mae_st_jax.data.synthetic import CLASSES, SyntheticVideos, VideoInfo


def _circular_centroid(mask: np.ndarray) -> np.ndarray:
    """(x, y) centroid of a boolean [H, W] mask on a torus (shapes wrap around the borders)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    out = []
    for coords, n in ((xs, w), (ys, h)):
        angle = np.angle(np.exp(2j * np.pi * (coords + 0.5) / n).mean())
        out.append(np.mod(angle / (2 * np.pi) * n, n))
    return np.array(out)


def _wrap(d: np.ndarray, size) -> np.ndarray:
    return np.mod(d + np.asarray(size) / 2, size) - np.asarray(size) / 2


def test_shape_dtype_and_info():
    ds = SyntheticVideos(10, num_classes=4, num_frames=32, height=48, width=40, fps=25.0, seed=3)
    assert len(ds) == 10
    x = ds.frames(2, np.arange(5))
    assert x.shape == (5, 48, 40, 3) and x.dtype == np.uint8
    assert ds.frames(2, np.array([], np.int64)).shape == (0, 48, 40, 3)
    info = ds.info(2)
    assert isinstance(info, VideoInfo)
    assert (info.num_frames, info.fps, info.name) == (32, 25.0, "synthetic_000002")
    assert 0 <= info.label < 4


def test_determinism():
    a = SyntheticVideos(8, seed=1, num_distractors=2)
    b = SyntheticVideos(8, seed=1, num_distractors=2)
    idx = np.arange(0, 64, 4)
    assert a.frames(5, idx).tobytes() == b.frames(5, idx).tobytes()
    assert a.frames(5, idx).tobytes() == a.frames(5, idx).tobytes()
    assert not np.array_equal(a.frames(5, idx), a.frames(6, idx))
    assert not np.array_equal(a.frames(5, idx), SyntheticVideos(8, seed=2, num_distractors=2).frames(5, idx))


@pytest.mark.parametrize("distractors", [0, 2])
def test_only_requested_frames(distractors):
    ds = SyntheticVideos(4, num_classes=16, height=56, width=72, num_distractors=distractors)
    for i in range(4):
        full = ds.frames(i, np.arange(10))
        np.testing.assert_array_equal(ds.frames(i, [3, 7]), full[[3, 7]])
        np.testing.assert_array_equal(ds.frames(i, [7, 3, 3]), full[[7, 3, 3]])
        np.testing.assert_array_equal(ds.frames(i, np.array([9], np.int32)), full[[9]])


def test_labels_balanced_and_stable():
    ds = SyntheticVideos(64, num_classes=8)
    labels = np.array([ds.info(i).label for i in range(64)])
    assert labels.min() >= 0 and labels.max() < 8
    np.testing.assert_array_equal(np.bincount(labels, minlength=8), np.full(8, 8))
    # a label depends on (seed, index) only, not on the size of the dataset
    small = SyntheticVideos(10, num_classes=8)
    assert [small.info(i).label for i in range(10)] == labels[:10].tolist()
    assert labels.tolist() != [SyntheticVideos(64, num_classes=8, seed=1).info(i).label for i in range(64)]


def test_class_table():
    assert len(set(CLASSES)) == len(CLASSES) >= 16
    right, left, down, up = (1, 0), (-1, 0), (0, 1), (0, -1)
    assert CLASSES[:8] == (("square", right), ("disk", right), ("square", left), ("disk", left),
                           ("square", down), ("disk", down), ("square", up), ("disk", up))
    assert {kind for kind, _ in CLASSES[8:16]} == {"triangle", "ring"}


def test_consecutive_frames_differ():
    ds = SyntheticVideos(16, num_classes=16)
    for i in range(16):
        x = ds.frames(i, np.arange(0, 32, 2)).astype(np.int16)
        changed = (np.abs(np.diff(x, axis=0)).max(-1) > 20).sum(axis=(1, 2))
        assert changed.min() >= 10, (i, changed)


def test_shape_moves_in_class_direction():
    # 32 classes: videos 0..31 hold every class once (shapes x cardinal and diagonal directions)
    ds = SyntheticVideos(32, num_classes=32, num_frames=256, seed=7)
    h, w = ds.height, ds.width
    seen = set()
    for i in range(32):
        label = ds.info(i).label
        seen.add(label)
        video = ds.frames(i, np.arange(256))
        background = np.median(video, axis=0)  # the shape covers each pixel well under half of the time
        assert np.abs(np.diff(background, axis=1)).max() <= 8  # smooth gradient background
        assert np.abs(np.diff(background, axis=0)).max() <= 8
        t = np.array([0, 2, 4, 6])
        masks = np.abs(video[t] - background).max(-1) > 25
        assert masks.sum(axis=(1, 2)).min() >= 0.01 * h * w  # the shape is visible in every frame
        cents = np.array([_circular_centroid(m) for m in masks])
        np.testing.assert_allclose(_wrap(cents - ds.centers(i, t), (w, h)), 0, atol=0.75)
        step = _wrap(np.diff(cents, axis=0), (w, h)).mean(0)  # pixels per 2 frames
        direction = np.array(CLASSES[label][1])
        np.testing.assert_array_equal(np.sign(np.round(step, 1)), direction, err_msg=f"video {i} label {label}")
        assert 1.5 < np.linalg.norm(step) < 6.0
    assert seen == set(range(32))


def test_errors():
    with pytest.raises(ValueError):
        SyntheticVideos(4, num_classes=1)
    with pytest.raises(ValueError):
        SyntheticVideos(4, num_classes=len(CLASSES) + 1)
    with pytest.raises(ValueError):
        SyntheticVideos(0)
    with pytest.raises(ValueError):
        SyntheticVideos(4, num_frames=0)
    with pytest.raises(ValueError):
        SyntheticVideos(4, fps=0.0)
    with pytest.raises(ValueError):
        SyntheticVideos(4, num_distractors=3)
    ds = SyntheticVideos(4, num_frames=20)
    for bad in (-1, 4):
        with pytest.raises(IndexError, match="out of range"):
            ds.frames(bad, np.arange(3))
        with pytest.raises(IndexError):
            ds.info(bad)
    for bad in ([-1], [0, 20], np.array([0.0, 1.0]), np.zeros((2, 2), np.int64)):
        with pytest.raises(ValueError):
            ds.frames(0, bad)


def test_label_by_shape_and_direction_and_plain_background():
    from mae_st_jax.data.synthetic import CLASSES, DIRECTIONS, SHAPES
    kw = dict(num_videos=40, num_classes=16, num_frames=8, height=32, width=32, seed=5)
    by_class = SyntheticVideos(**kw)
    by_shape = SyntheticVideos(label_by="shape", **kw)
    by_dir = SyntheticVideos(label_by="direction", **kw)
    for i in range(40):
        kind, direction = CLASSES[by_class.label(i)]
        assert by_shape.label(i) == SHAPES.index(kind)
        assert by_dir.label(i) == DIRECTIONS.index(direction)
        np.testing.assert_array_equal(by_shape.frames(i, [0, 3]), by_class.frames(i, [0, 3]))  # same videos
    assert sorted(set(by_shape.label(i) for i in range(40))) == [0, 1, 2, 3]
    plain = SyntheticVideos(background="plain", radius=(0.1, 0.1), **kw)
    frame = plain.frames(0, [0])[0].reshape(-1, 3)
    colours, counts = np.unique(frame, axis=0, return_counts=True)
    assert counts.max() > 0.8 * len(frame)  # one background colour covers most of the frame
    with pytest.raises(ValueError, match="label_by"):
        SyntheticVideos(label_by="colour", **kw)
    with pytest.raises(ValueError, match="radius"):
        SyntheticVideos(radius=(0.3, 0.1), **kw)


def test_label_by_orientation_matches_the_rendered_background():
    """The 'orientation' label is the axis along which the background's colour changes, read back from
    the pixels by a least-squares plane fit per channel, mod 180 degrees, binned to 45 degrees."""
    from mae_st_jax.data.synthetic import ORIENTATIONS, orientation_bin
    n = 64
    kw = dict(num_videos=n, num_classes=16, num_frames=4, height=48, width=48, seed=3, radius=(0.075, 0.08))
    ds = SyntheticVideos(label_by="orientation", **kw)
    by_class = SyntheticVideos(**kw)
    yy, xx = np.mgrid[0:48, 0:48] + 0.5
    design = np.stack([np.ones(48 * 48), xx.ravel(), yy.ravel()], 1)
    labels, near_edge = [], 0
    for i in range(n):
        frame = ds.frames(i, [0])[0].reshape(-1, 3).astype(np.float64)
        np.testing.assert_array_equal(frame, by_class.frames(i, [0])[0].reshape(-1, 3))  # the same videos
        cx, cy = ds.centers(i, [0])[0]
        dx, dy = (np.mod(d + 24, 48) - 24 for d in (xx.ravel() - cx, yy.ravel() - cy))  # toroidal offsets
        background = np.hypot(dx, dy) > kw["radius"][1] * 48 * 1.2 + 2  # pixels no shape (triangles 1.2x) touches
        coef = np.linalg.lstsq(design[background], frame[background], rcond=None)[0][1:]  # [2 (x, y), 3]
        strongest = coef[:, np.argmax(np.linalg.norm(coef, axis=0))]
        if np.linalg.norm(strongest) * 48 < 20:  # end colours too alike for uint8 pixels to give the angle
            continue
        fitted = np.mod(np.arctan2(strongest[1], strongest[0]), np.pi)
        offset = np.mod(fitted + np.pi / 8, np.pi / 4)  # bin edges at 22.5 + 45k degrees
        if min(offset, np.pi / 4 - offset) < np.radians(2):  # within 2 degrees of a bin edge
            near_edge += 1
            continue
        assert ds.label(i) == orientation_bin(fitted), i
        assert ds.info(i).label == ds.label(i)
        labels.append(ds.label(i))
    assert len(labels) >= n // 2 and near_edge < n // 4
    assert set(labels) == set(range(len(ORIENTATIONS)))
    # the bins: 0 and 180 degrees are one axis, 22.4 rounds down, 22.6 up, 170 is horizontal again
    assert [orientation_bin(np.radians(a)) for a in (0, 180, 22.4, 22.6, 90, 135, 170, -45)] == [0, 0, 0, 1, 2, 3, 0, 3]
    with pytest.raises(ValueError, match="gradient"):
        SyntheticVideos(label_by="orientation", background="plain", **kw)
