"""The shard format: one tf.train.SequenceExample per video in TFRecord files, record offsets, JPEG frames.

Field names follow DMVR / MediaSequence:
  context  clip/data_path (bytes)      source video path
           clip/media_id (bytes)       a short name (the file name without extension)
           clip/label/index (int64)    class index, -1 when unlabelled
           clip/label/string (bytes)   class name ('' when unknown)
           clip/frame_count (int64)    number of frames stored
           image/frame_rate (float)    frames per second of the stored frames
           image/height, image/width (int64), image/format (bytes, 'JPEG')
  feature list
           image/encoded (bytes)       one JPEG per frame, in order
           image/timestamp (int64)     microseconds, frame k at k / frame_rate

TFRecord framing per record: uint64 length, uint32 masked crc32c(length), data, uint32 masked
crc32c(data). A shard's index (record offsets plus each video's frame count, rate and label) is
written beside it by make_shards as SHARD.index.json, or rebuilt by scanning the framing.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import threading
from collections import OrderedDict

import cv2
import google_crc32c
import numpy as np
import tensorflow as tf
from tensorflow.core.example import example_pb2

ENCODED = "image/encoded"
TIMESTAMP = "image/timestamp"
FRAME_RATE = "image/frame_rate"
HEIGHT, WIDTH, FORMAT = "image/height", "image/width", "image/format"
LABEL_INDEX = "clip/label/index"
LABEL_STRING = "clip/label/string"
DATA_PATH = "clip/data_path"
MEDIA_ID = "clip/media_id"
FRAME_COUNT = "clip/frame_count"
INDEX_SUFFIX = ".index.json"
_HEADER = 12  # uint64 length + uint32 crc


@dataclasses.dataclass
class ParsedVideo:
    frames: list  # encoded frames (bytes), one per frame
    fps: float
    label: int
    name: str


# ---------------------------------------------------------------- SequenceExample

def encode_video(jpegs: list[bytes], *, fps: float, label: int, label_name: str, path: str, name: str,
                 height: int, width: int) -> bytes:
    """Serialized SequenceExample of one video."""
    seq = example_pb2.SequenceExample()
    ctx = seq.context.feature
    ctx[DATA_PATH].bytes_list.value.append(path.encode())
    ctx[MEDIA_ID].bytes_list.value.append(name.encode())
    ctx[LABEL_INDEX].int64_list.value.append(int(label))
    ctx[LABEL_STRING].bytes_list.value.append(label_name.encode())
    ctx[FRAME_COUNT].int64_list.value.append(len(jpegs))
    ctx[FRAME_RATE].float_list.value.append(float(fps))
    ctx[HEIGHT].int64_list.value.append(int(height))
    ctx[WIDTH].int64_list.value.append(int(width))
    ctx[FORMAT].bytes_list.value.append(b"JPEG")
    encoded = seq.feature_lists.feature_list[ENCODED].feature
    stamps = seq.feature_lists.feature_list[TIMESTAMP].feature
    for k, jpeg in enumerate(jpegs):
        encoded.add().bytes_list.value.append(jpeg)
        stamps.add().int64_list.value.append(int(round(k * 1e6 / fps)))
    return seq.SerializeToString()


def parse_video(data: bytes) -> ParsedVideo:
    """ParsedVideo from a serialized SequenceExample; raises ValueError when fields are missing."""
    seq = example_pb2.SequenceExample.FromString(data)
    ctx = seq.context.feature
    if ENCODED not in seq.feature_lists.feature_list:
        raise ValueError(f"no '{ENCODED}' feature list")
    frames = [f.bytes_list.value[0] if f.bytes_list.value else b""
              for f in seq.feature_lists.feature_list[ENCODED].feature]

    def first(key, kind, default):
        if key not in ctx:
            return default
        values = getattr(ctx[key], kind).value
        return values[0] if values else default

    name = first(MEDIA_ID, "bytes_list", b"") or first(DATA_PATH, "bytes_list", b"")
    return ParsedVideo(frames=frames, fps=float(first(FRAME_RATE, "float_list", 0.0)),
                       label=int(first(LABEL_INDEX, "int64_list", -1)), name=name.decode("utf-8", "replace"))


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] RGB from JPEG or PNG bytes; ValueError when undecodable."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB) if data else None
    if image is None:
        raise ValueError("undecodable image")
    return image


# ---------------------------------------------------------------- TFRecord framing

def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C (pure Python: used for the 8-byte length headers)."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return _mask(crc)


def _mask(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def masked_crc32c_fast(data: bytes) -> int:
    """masked_crc32c of a whole record (google-crc32c's C code: ~4 GB/s)."""
    return _mask(google_crc32c.value(data))


def scan_offsets(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(offsets, lengths, problem) of the records in a TFRecord file, reading only the 12-byte headers.

    Stops at a truncated or corrupt header; `problem` then says where ('' when the file is whole).
    """
    size = tf.io.gfile.stat(path).length
    offsets, lengths, problem = [], [], ""
    with tf.io.gfile.GFile(path, "rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            header = f.read(_HEADER)
            if len(header) < _HEADER:
                problem = f"truncated record header at byte {pos}"
                break
            length, crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8]) != crc:
                problem = f"corrupt record header at byte {pos}"
                break
            end = pos + _HEADER + length + 4
            if end > size:
                problem = f"truncated record at byte {pos}"
                break
            offsets.append(pos + _HEADER)
            lengths.append(length)
            pos = end
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), problem


def write_index(path: str, index: dict) -> None:
    with tf.io.gfile.GFile(path + INDEX_SUFFIX, "w") as f:
        json.dump(index, f)


def load_index(path: str) -> dict:
    """{'offsets', 'lengths'} and, when make_shards wrote the index, 'num_frames', 'fps', 'labels', 'names'.

    Uses SHARD.index.json when present and written for a file of this size, else scans the framing.
    """
    side = path + INDEX_SUFFIX
    size = tf.io.gfile.stat(path).length
    if tf.io.gfile.exists(side):
        try:
            with tf.io.gfile.GFile(side, "r") as f:
                index = json.load(f)
            if index.get("file_size") == size and len(index["offsets"]) == len(index["lengths"]):
                return index
        except (ValueError, KeyError, tf.errors.OpError):
            pass  # a broken or stale side file: scan instead
    offsets, lengths, problem = scan_offsets(path)
    return {"file_size": size, "offsets": offsets.tolist(), "lengths": lengths.tolist(), "problem": problem}


class RecordReader:
    """Thread-safe reads of records by (file, offset, length); a few open files kept per thread.
    Each record's data CRC (the 4 bytes after it) is checked, as tf.data's TFRecordDataset does:
    a record whose bytes changed raises OSError (a counted skip) instead of returning bad frames."""

    def __init__(self, max_open: int = 8):
        self._local = threading.local()
        self._max_open = max_open

    def read(self, path: str, offset: int, length: int) -> bytes:
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = OrderedDict()
        f = files.pop(path, None)
        if f is None:
            f = tf.io.gfile.GFile(path, "rb")
            while len(files) >= self._max_open:
                files.popitem(last=False)[1].close()
        files[path] = f
        f.seek(int(offset))
        data = f.read(int(length) + 4)
        if len(data) != length + 4:
            raise EOFError(f"{path}: short read at byte {offset}")
        data, crc = data[:-4], struct.unpack("<I", data[-4:])[0]
        if masked_crc32c_fast(data) != crc:
            raise OSError(f"{path}: record at byte {offset} fails its data checksum (corrupt shard)")
        return data
