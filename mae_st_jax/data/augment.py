"""Spatial augmentation of a clip, one parameter set per clip applied to every frame (PySlowFast semantics).

Boxes are (top, left, height, width) in source pixels. Resizing is bilinear with half-pixel centres
(OpenCV INTER_LINEAR, as torch's interpolate(mode='bilinear', align_corners=False)).
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, area=(0.5, 1.0),
                            aspect=(0.75, 4 / 3), tries: int = 10) -> tuple[int, int, int, int]:
    """A box of area fraction U[area] and log-uniform aspect (w/h) in `aspect`; 10 tries, then a centre crop."""
    total = height * width
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(tries):
        target = total * rng.uniform(area[0], area[1])
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    ratio = width / height  # fallback: the largest centre crop with an aspect inside the range
    if ratio < min(aspect):
        w, h = width, int(round(width / min(aspect)))
    elif ratio > max(aspect):
        h, w = height, int(round(height * max(aspect)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(frames: np.ndarray, box, size: int, flip: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [T, size, size, C]: the same box of every frame resized to size x size, mirrored if flip
    (written into `out` when given)."""
    top, left, h, w = box
    if out is None:
        out = np.empty((len(frames), size, size, frames.shape[-1]), np.uint8)
    for t, frame in enumerate(frames):
        patch = frame[top:top + h, left:left + w]
        if patch.shape[:2] != (size, size):
            patch = cv2.resize(patch, (size, size), interpolation=cv2.INTER_LINEAR)
        if flip:
            cv2.flip(patch, 1, dst=out[t])  # a real copy: negative-stride views are slow to batch
        else:
            out[t] = patch
    return out


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(height, width) with the shorter side `short` and the longer floor(long / shorter * short), in
    the reference's operation order (PySlowFast's short-side scale: float(long) / short_side first)."""
    if h <= w:
        return short, int(math.floor(float(w) / h * short))
    return int(math.floor(float(h) / w * short)), short


def resize_short_side(frames: np.ndarray, short: int) -> np.ndarray:
    """Every frame resized (bilinear) so its shorter side is `short`, keeping the aspect ratio."""
    h, w = frames.shape[1:3]
    if min(h, w) == short:
        return frames
    new_h, new_w = short_side_size(h, w, short)
    return np.stack([cv2.resize(f, (new_w, new_h), interpolation=cv2.INTER_LINEAR) for f in frames])


def random_resized_crop(rng: np.random.Generator, frames: np.ndarray, size: int, area=(0.5, 1.0),
                        aspect=(0.75, 4 / 3), flip: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """Training augmentation: RandomResizedCrop then a horizontal flip with p=0.5 (when flip)."""
    box = random_resized_crop_box(rng, frames.shape[1], frames.shape[2], area, aspect)
    mirror = bool(flip and rng.random() < 0.5)
    return crop_resize(frames, box, size, mirror, out)


def jitter_crop(rng: np.random.Generator, frames: np.ndarray, size: int, scales=(256, 320),
                flip: bool = False) -> np.ndarray:
    """Validation jitter, PySlowFast's random_short_side_scale_jitter + random_crop: shorter side
    resized to round(U(scales[0], scales[1])) (so the two ends are half as likely as the sizes between),
    a random size x size crop whose offset is drawn from [0, h - size) (the reference never takes the
    last offset), optionally a flip with p=0.5."""
    short = int(round(rng.uniform(scales[0], scales[1])))
    frames = resize_short_side(frames, short)
    h, w = frames.shape[1:3]
    top = int(rng.integers(0, h - size)) if h > size else 0
    left = int(rng.integers(0, w - size)) if w > size else 0
    mirror = bool(flip and rng.random() < 0.5)
    return crop_resize(frames, (top, left, size, size), size, mirror)


def uniform_crop_box(height: int, width: int, size: int, index: int) -> tuple[int, int, int, int]:
    """Test-time crop `index` (0, 1, 2) of size x size along the longer side: left/top, centre,
    right/bottom (PySlowFast uniform_crop)."""
    if index not in (0, 1, 2):
        raise ValueError(f"spatial crop index must be 0, 1 or 2, got {index}")
    top, left = int(math.ceil((height - size) / 2)), int(math.ceil((width - size) / 2))
    if height > width:
        top = (0, top, height - size)[index]
    else:
        left = (0, left, width - size)[index]
    return top, left, size, size


def test_crops(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [3, T, size, size, C]: shorter side resized to `size`, then left/centre/right (or
    top/centre/bottom) crops along the longer side."""
    frames = resize_short_side(frames, size)
    return np.stack([crop_resize(frames, uniform_crop_box(*frames.shape[1:3], size, i), size) for i in range(3)])


test_crops.__test__ = False  # not a pytest test despite the name


def jitter_min_scale(size: int) -> int:
    """The short side PySlowFast's train jitter starts at (256 for 224 crops), scaled to `size`."""
    return int(round(size * 256 / 224))


def center_crop(frames: np.ndarray, size: int, short: int | None = None) -> np.ndarray:
    """Shorter side resized to `short` (default `size`), then the centre size x size crop (a no-op for
    size x size input)."""
    if frames.shape[1:3] == (size, size):
        return frames
    frames = resize_short_side(frames, short or size)
    return crop_resize(frames, uniform_crop_box(*frames.shape[1:3], size, 1), size)
