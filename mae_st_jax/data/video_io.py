"""Video files through PyAV: probe length and frame rate, decode only the requested frames, or all of them."""

from __future__ import annotations

import math
import os
import stat

import av
import numpy as np

from mae_st_jax.data.augment import short_side_size

DEFAULT_FPS = 30.0  # used when a container states no frame rate
# what a broken, missing or unsupported file raises while being opened or decoded
DECODE_ERRORS = (av.error.FFmpegError, OSError, EOFError, ValueError, IndexError, RuntimeError)


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    return fps if math.isfinite(fps) and fps > 0 else DEFAULT_FPS


def open_container(path: str):
    """av.open for a file to decode; a local path that is not a regular file (a FIFO or a device would
    block the reader for ever, a folder) is refused first."""
    if "://" not in path and os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path}: not a regular file")
    return av.open(path)


def probe(path: str) -> tuple[int, float]:
    """(number of frames, frames per second) from the container header; frames estimated from the
    duration when the header has no count. Raises one of DECODE_ERRORS for an unreadable file."""
    with open_container(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        n = int(stream.frames or 0)
        if n <= 0:
            if stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                seconds = container.duration / av.time_base
            else:
                seconds = 0.0
            n = int(round(seconds * fps))
        return n, fps


def _rgb(frame, short_side: int = 0) -> np.ndarray:
    if short_side and min(frame.height, frame.width) != short_side:  # swscale's area resize, as make_shards
        h, w = short_side_size(frame.height, frame.width, short_side)
        return frame.to_ndarray(format="rgb24", width=w, height=h, interpolation="AREA")
    return frame.to_ndarray(format="rgb24")


class PastEnd(ValueError):
    """Most of a clip's frames lie past the stream's real end (a header that claims more frames than the
    file has, or a truncated file): `frames` is the real count."""

    def __init__(self, message: str, frames: int):
        super().__init__(message)
        self.frames = frames


def read_frames(path: str, frame_indices, fps: float | None = None, short_side: int = 0) -> np.ndarray:
    """uint8 [len(frame_indices), H, W, 3]: the frames numbered 0, 1, ... in presentation order
    (resized so the shorter side is `short_side` when > 0).

    Seeks to the key frame before the first wanted frame (frame i is at time i / fps), decodes up to
    the last wanted one and converts only the wanted frames to RGB. A wanted frame that the stream
    skips takes the latest frame before it; wanted frames past the real end take the last frame, unless
    they are more than half of the clip's frames: then PastEnd (the clip would be one still frame).
    """
    idx = np.asarray(frame_indices, np.int64)
    wanted = np.unique(idx)
    with open_container(path) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        fps = float(fps or _stream_fps(stream))
        got = _decode_wanted(container, stream, wanted, fps, seek=wanted.size > 0 and wanted[0] > 0,
                             short_side=short_side)
        if got is None:  # the seek landed past the first wanted frame: decode from the start
            container.seek(0, stream=stream)
            got = _decode_wanted(container, stream, wanted, fps, seek=False, short_side=short_side)
    if got is None or not got[0]:
        raise ValueError(f"{path}: no frame could be decoded")
    got, end = got
    if end is not None and 2 * int((wanted >= end).sum()) > len(wanted):
        raise PastEnd(f"{path}: the stream ends after {end} frames, before most of the clip (frames "
                      f"{wanted[0]}..{wanted[-1]})", end)
    by_index = dict(zip(wanted.tolist(), got))
    return np.stack([by_index[i] for i in idx.tolist()])


def _decode_wanted(container, stream, wanted: np.ndarray, fps: float, seek: bool, short_side: int = 0):
    """(RGB arrays for `wanted` (sorted, unique), the stream's real frame count when it ended before the
    last of them, else None), or None when a seek overshot the first of them."""
    time_base = float(stream.time_base) if stream.time_base else 0.0
    start = stream.start_time or 0
    use_pts = time_base > 0
    if seek and use_pts:
        container.seek(start + int(wanted[0] / fps / time_base), stream=stream, backward=True)
    out: list[np.ndarray] = []
    prev, prev_i, counter, last = None, -1, 0, [None, None]  # last: (frame, its RGB array), reused for repeats

    def rgb(frame):
        if last[0] is not frame:
            last[:] = [frame, _rgb(frame, short_side)]
        return last[1]

    k = 0
    for frame in container.decode(stream):
        if use_pts and frame.pts is not None:
            i = int(round((frame.pts - start) * time_base * fps))
        else:
            if seek:  # no timestamps to place a seek: the caller decodes from the start
                return None
            i = counter
        counter += 1
        if prev is None and seek and i > wanted[0]:
            return None
        while k < len(wanted) and wanted[k] < i:  # the stream skipped this index: latest earlier frame
            out.append(rgb(prev if prev is not None else frame))
            k += 1
        if k < len(wanted) and wanted[k] == i:
            out.append(rgb(frame))
            k += 1
        if k == len(wanted):
            return out, None
        prev, prev_i = frame, i
    if prev is None:
        return out, None
    end = prev_i + 1 if k < len(wanted) else None
    while k < len(wanted):  # past the real end of the video
        out.append(rgb(prev))
        k += 1
    return out, end


def iter_frames(path: str, fps: float = 0.0, width: int = 0, height: int = 0):
    """(source fps, generator of uint8 [h, w, 3] RGB frames in order), resampled to `fps` when > 0
    (output frame k is source frame floor(k * source_fps / fps)) and resized when width/height > 0."""
    container = open_container(path)
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: no video stream")
    stream = container.streams.video[0]
    src_fps = _stream_fps(stream)

    def frames():
        try:
            k = 0
            for i, frame in enumerate(container.decode(stream)):
                if fps > 0:
                    repeats = 0
                    while int(math.floor(k * src_fps / fps + 1e-9)) == i:
                        repeats, k = repeats + 1, k + 1
                    if not repeats:
                        continue
                else:
                    repeats = 1
                kwargs = dict(width=width, height=height, interpolation="AREA") if width and height else {}
                array = frame.to_ndarray(format="rgb24", **kwargs)
                for _ in range(repeats):
                    yield array
        finally:
            container.close()

    return src_fps, frames()
