"""Write video files with PyAV for tests, benchmarks and demos: moving shapes or a panning noisy texture."""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

from mae_st_jax.data.synthetic import SyntheticVideos


def texture_frames(num_frames: int, height: int, width: int, seed: int = 0, noise: int = 14):
    """Frames of a 1/f-like texture panning along an ellipse plus per-frame noise: bitrates like
    real footage (about 400 kbit/s for 320x256 at 30 fps in H.264 at the default quality)."""
    import cv2
    rng = np.random.default_rng(seed)
    big = np.zeros((2 * height, 2 * width, 3), np.float32)
    for k, cells in enumerate((4, 8, 16, 32, 64, 128)):
        small = rng.uniform(-1, 1, (cells, cells * width // height + 1, 3)).astype(np.float32)
        big += cv2.resize(small, (2 * width, 2 * height), interpolation=cv2.INTER_CUBIC) / (k + 1)
    big = ((big - big.min()) / (big.max() - big.min()) * 255).astype(np.uint8)
    for t in range(num_frames):
        y0 = int(height / 2 + height / 2 * np.sin(t / 40))
        x0 = int(width / 2 + width / 2 * np.cos(t / 50))
        frame = big[y0:y0 + height, x0:x0 + width].astype(np.int16)
        yield np.clip(frame + rng.integers(-noise, noise + 1, frame.shape), 0, 255).astype(np.uint8)


def shape_frames(num_frames: int, height: int, width: int, seed: int = 0, label: int = 0):
    """The synthetic source's moving-shape frames (class `label`), rendered at this size."""
    source = SyntheticVideos(num_videos=label + 1, num_classes=8, num_frames=num_frames, height=height,
                             width=width, seed=seed)
    frames = source.frames(label, np.arange(num_frames))
    yield from frames


def write_video(path: str, frames, fps: float = 30, codec: str = "h264", options: dict | None = None) -> int:
    """Encode RGB uint8 frames (an iterable of [H, W, 3]) into `path`; returns the number written."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    count = 0
    with av.open(path, "w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001),
                                              options=options or {})
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
            count += 1
        if stream is not None:
            for packet in stream.encode():
                container.mux(packet)
    return count
