"""Random-access video sources over real data: TFRecord shards, a list of video files, a TFDS dataset.

Each has the interface of data/synthetic.py: `len(source)`, `info(i) -> VideoInfo` and
`frames(i, frame_indices) -> uint8 [n, H, W, 3]`, decoding only the requested frames. A video that
cannot be read raises BadVideo (the loader skips it and counts it); a problem a user must fix (an
empty pattern, a list naming no readable file, a label outside num_classes) raises ValueError at
construction. Sources with `host_local = True` hold only this process's share of the files.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections import OrderedDict

import numpy as np
import tensorflow as tf
from absl import logging
from google.protobuf.message import DecodeError

from mae_st_jax.data import records, video_io
from mae_st_jax.data.errors import BadVideo, FrameCountChanged
from mae_st_jax.data.synthetic import VideoInfo

READ_ERRORS = video_io.DECODE_ERRORS + (DecodeError, tf.errors.OpError)


class _LRU:
    """A small thread-safe least-recently-used cache."""

    def __init__(self, size: int):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


def _decode_frames(encoded, frame_indices, where: str) -> np.ndarray:
    """uint8 [n, H, W, 3] from encoded frames (a list of JPEG/PNG bytes, or already decoded arrays)."""
    idx = np.asarray(frame_indices, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(encoded)):
        raise BadVideo(f"{where}: frame indices {idx.min()}..{idx.max()} outside its {len(encoded)} frames")
    unique, inverse = np.unique(idx, return_inverse=True)
    try:
        decoded = [records.decode_image(encoded[i]) if isinstance(encoded[i], bytes) else np.asarray(encoded[i])
                   for i in unique.tolist()]
    except ValueError as e:
        raise BadVideo(f"{where}: {e}") from e
    if len({d.shape for d in decoded}) > 1:
        raise BadVideo(f"{where}: frames of different sizes {sorted({d.shape for d in decoded})}")
    return np.stack([decoded[k] for k in inverse.ravel().tolist()])  # one copy, repeats included


def host_files(files: list[str], what: str, process_index: int, process_count: int) -> list[str]:
    """This process's files (every process_count-th, starting at process_index) of a sorted list."""
    if not files:
        raise ValueError(f"{what} matches no file")
    if len(files) < process_count:
        raise ValueError(f"{what} has {len(files)} files, fewer than the {process_count} processes: write at "
                         f"least {process_count} shards (make_shards --num_shards)")
    return files[process_index::process_count]


def glob_shards(pattern: str) -> list[str]:
    """Sorted files matching a glob (or comma-separated globs), shard index files left out."""
    files = set()
    for p in (p.strip() for p in pattern.split(",")):
        if p:
            files.update(tf.io.gfile.glob(p))
    return sorted(f for f in files if not f.endswith(records.INDEX_SUFFIX))


class _ShardedRecords:
    """Videos in TFRecord files read by offset; per-video metadata from the shard indexes when known."""

    host_local = True

    def __init__(self, files: list[str], num_workers: int = 8):
        with concurrent.futures.ThreadPoolExecutor(max(1, min(num_workers, len(files)))) as pool:
            indexes = list(pool.map(records.load_index, files))
        self.files = files

        def join(key, dtype):
            return np.concatenate([np.asarray(ix[key], dtype) for ix in indexes])

        self._file_id = np.concatenate([np.full(len(ix["offsets"]), k, np.int32) for k, ix in enumerate(indexes)])
        self._record = np.concatenate([np.arange(len(ix["offsets"])) for ix in indexes])
        self._offset, self._length = join("offsets", np.int64), join("lengths", np.int64)
        self._meta = None  # per-video num_frames, fps, labels, names when every index has them (make_shards)
        if all("num_frames" in ix for ix in indexes):
            self._meta = dict(num_frames=join("num_frames", np.int64), fps=join("fps", np.float64),
                              labels=join("labels", np.int64), names=join("names", object))
        for path, ix in zip(files, indexes):
            if ix.get("problem"):
                logging.warning("%s: %s; the %d records before it are used", path, ix["problem"],
                                len(ix["offsets"]))
        self._reader = records.RecordReader()
        self._cache = _LRU(max(16, 2 * num_workers))  # parsed records: info() and frames() of one read

    def __len__(self) -> int:
        return len(self._offset)

    def where(self, index: int) -> str:
        return f"{self.files[self._file_id[index]]} record {self._record[index]}"

    def read(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(f"video index {index} out of range [0, {len(self)})")
        try:
            return self._reader.read(self.files[self._file_id[index]], self._offset[index], self._length[index])
        except READ_ERRORS as e:
            raise BadVideo(f"{self.where(index)}: {e}") from e


class TFRecordVideos(_ShardedRecords):
    """SequenceExample shards written by make_shards (records.py names the fields)."""

    def __init__(self, pattern: str, *, num_classes: int | None = None, process_index: int = 0,
                 process_count: int = 1, num_workers: int = 8):
        files = host_files(glob_shards(pattern), f"config.data.path={pattern!r}", process_index, process_count)
        super().__init__(files, num_workers)
        if not len(self):
            raise ValueError(f"config.data.path={pattern!r}: the shards of process {process_index} hold no record")
        self.num_classes = num_classes
        if self._meta is not None:
            check_labels(self._meta["labels"], num_classes,
                         lambda k: f"{self.where(k)} ({self._meta['names'][k]})")

    def _parsed(self, index: int) -> records.ParsedVideo:
        def make():
            try:
                return records.parse_video(self.read(index))
            except (DecodeError, ValueError) as e:
                raise BadVideo(f"{self.where(index)}: {e}") from e
        return self._cache.get(index, make)

    def info(self, index: int) -> VideoInfo:
        if self._meta is not None and 0 <= index < len(self):
            n, fps, label, name = (self._meta[k][index] for k in ("num_frames", "fps", "labels", "names"))
        else:
            p = self._parsed(index)
            n, fps, label, name = len(p.frames), p.fps, p.label, p.name
        if n < 1 or not fps > 0:
            raise BadVideo(f"{self.where(index)} ({name}): {n} frames at {fps} fps")
        if self.num_classes and not 0 <= label < self.num_classes:
            raise ValueError(f"{self.where(index)} ({name}) has label {label} outside [0, {self.num_classes}): "
                             f"{_LABEL_HINT}")
        return VideoInfo(int(n), float(fps), int(label), str(name))

    def frames(self, index: int, frame_indices) -> np.ndarray:
        return _decode_frames(self._parsed(index).frames, frame_indices, self.where(index))


def _parse_label(text: str):
    try:
        return int(text)
    except ValueError:
        return text


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_list(path: str, class_names: list[str] | None = None,
              class_names_from: str = "the training list's class names") -> tuple[list[str], list[int], list[str]]:
    """(video paths, label indices, class names) of a list file with one `path label` per line.

    A line with a comma splits at its last comma (Kinetics CSVs: class names may hold spaces), any other
    line at its last whitespace (so a class name with spaces needs the comma). Labels are all ints, or all class names mapped through
    classes.txt beside the list (one name per line) when present, else through `class_names` (e.g.
    the training list's, so a validation list missing a class keeps the training numbering), else
    through the sorted unique names. Relative paths are taken from the list's folder. Raises
    ValueError naming the file and line (a mix of int and name labels, or numbers that are not ints,
    is an error rather than a guess)."""
    if not tf.io.gfile.exists(path):
        raise ValueError(f"video list {path!r} does not exist")
    with tf.io.gfile.GFile(path, "r") as f:
        lines = [(number, line.strip()) for number, line in enumerate(f.read().lstrip("\ufeff").splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line and not line.startswith("#")]
    base = os.path.dirname(path)
    entries = []  # (line number, path, label)
    for number, line in lines:
        parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"{path}:{number}: expected 'path label', got {line!r}")
        video, label = parts[0].strip(), parts[1].strip()
        if not entries and (video.lower(), label.lower()) == ("path", "label"):
            continue  # a header line
        if not (os.path.isabs(video) or "://" in video):
            video = os.path.join(base, video)
        entries.append((number, video, _parse_label(label)))
    if not entries:
        raise ValueError(f"video list {path!r} names no video")
    kinds = [isinstance(e[2], int) for e in entries]
    if all(kinds):
        return [e[1] for e in entries], [e[2] for e in entries], []
    if any(kinds):
        first_int, first_name = entries[kinds.index(True)], entries[kinds.index(False)]
        raise ValueError(f"{path}: line {first_int[0]} has an integer label ({first_int[2]}) but line "
                         f"{first_name[0]} a class name ({first_name[2]!r}): use one kind of label for every line")
    classes_file = os.path.join(base, "classes.txt")
    if tf.io.gfile.exists(classes_file):
        names, origin = read_class_names(classes_file), classes_file
    elif class_names:
        names, origin = list(class_names), class_names_from
    else:
        if all(_is_number(e[2]) for e in entries):
            number, _, label = entries[0]
            raise ValueError(f"{path}:{number}: label {label!r} is a number but not an integer: write class "
                             f"indices as integers")
        names, origin = sorted({e[2] for e in entries}), ""
    lookup = {n: i for i, n in enumerate(names)}
    indices = []
    for number, _, label in entries:
        if label not in lookup:
            raise ValueError(f"{path}:{number}: class {label!r} is not in {origin}")
        indices.append(lookup[label])
    return [e[1] for e in entries], indices, names


def read_class_names(path: str) -> list[str]:
    """The class names of a classes.txt, one per line (blank lines ignored)."""
    with tf.io.gfile.GFile(path, "r") as f:
        return [l.strip() for l in f.read().splitlines() if l.strip()]


def training_class_names(config) -> list[str] | None:
    """The class names of the training list config.data.path (a `videos` list of names), else None."""
    path = config.data.path
    if not path or path == config.data.eval_path or not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
        return None
    return read_list(path)[2] or None


def list_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """(video paths, label indices, class names) of a folder of class folders (sorted names)."""
    names = sorted(d for d in tf.io.gfile.listdir(root) if tf.io.gfile.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for k, name in enumerate(names):
        for f in sorted(tf.io.gfile.listdir(os.path.join(root, name))):
            if not tf.io.gfile.isdir(os.path.join(root, name, f)):
                paths.append(os.path.join(root, name, f.rstrip("/")))
                labels.append(k)
    if not paths:
        raise ValueError(f"folder {root!r} has no class folder with videos in it")
    return paths, labels, names


_LABEL_HINT = ("check config.data.num_classes (-1 marks an unlabelled video: fine-tuning and evaluation "
               "need a label for every video)")


def check_labels(labels, num_classes: int | None, where) -> None:
    """ValueError naming where(k) for the first label outside [0, num_classes), -1 (unlabelled)
    included; num_classes None (pre-training, which ignores labels) checks nothing."""
    if not num_classes:
        return
    labels = np.asarray(labels)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(f"{where(bad[0])}: label {labels[bad[0]]} outside [0, {num_classes}): {_LABEL_HINT}")


class VideoFiles:
    """Videos decoded with PyAV from a list file (`path label` per line), every frame index from the
    container's timestamps; info is probed once per video and kept. short_side > 0: frames come
    resized to that shorter side (swscale's area filter, as make_shards), as the reference decodes."""

    host_local = False

    def __init__(self, list_path: str, *, num_classes: int | None = None, fps: float = 0.0,
                 class_names: list[str] | None = None, short_side: int = 0):
        self.paths, self.labels, self.class_names = read_list(list_path, class_names)
        self.list_path, self.fps, self.short_side = list_path, fps, int(short_side)
        check_labels(self.labels, num_classes, lambda k: f"{list_path} entry {k + 1} ({self.paths[k]})")
        local = [p for p in self.paths if "://" not in p]
        missing = [p for p in local if not os.path.exists(p)]
        remote = [p for p in self.paths if "://" in p][:32]
        missing += [p for p in remote if not tf.io.gfile.exists(p)]
        if len(missing) == len(local) + len(remote):
            raise ValueError(f"{list_path} names no readable file (first: {self.paths[0]!r}; relative paths are "
                             f"taken from the list's folder)")
        if missing:
            logging.warning("%s: %d of its %d videos are missing (first: %s); they will be skipped", list_path,
                            len(missing), len(self.paths), missing[0])
        self._infos: dict[int, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _probe(self, index: int) -> tuple[int, float]:
        if index not in self._infos:
            try:
                n, fps = video_io.probe(self.paths[index])
            except READ_ERRORS as e:
                raise BadVideo(f"{self.paths[index]}: {e}") from e
            self._infos[index] = (n, self.fps or fps)
        return self._infos[index]

    def info(self, index: int) -> VideoInfo:
        if not 0 <= index < len(self):
            raise IndexError(f"video index {index} out of range [0, {len(self)})")
        n, fps = self._probe(index)
        if n < 1:
            raise BadVideo(f"{self.paths[index]}: no frames")
        return VideoInfo(n, fps, self.labels[index], self.paths[index])

    def frames(self, index: int, frame_indices) -> np.ndarray:
        n, fps = self._probe(index)
        try:
            return video_io.read_frames(self.paths[index], frame_indices, fps, self.short_side)
        except video_io.PastEnd as e:
            if e.frames >= n:
                raise BadVideo(str(e)) from e
            self._infos[index] = (e.frames, fps)
            logging.warning("%s: its header says %d frames, the stream ends after %d: clips come from those",
                            self.paths[index], n, e.frames)
            raise FrameCountChanged(f"{e} (its header says {n})") from e
        except READ_ERRORS as e:
            raise BadVideo(f"{self.paths[index]}: {e}") from e


class TFDSVideos(_ShardedRecords):
    """A prepared TFDS dataset (a name found in data_dir, or a dataset directory) in TFRecord files;
    frames read still encoded (tfds.decode.SkipDecoding) and only the sampled ones decoded."""

    def __init__(self, name: str, *, split: str = "train", data_dir: str = "", video_key: str = "video",
                 label_key: str = "label", fps: float = 30.0, num_classes: int | None = None,
                 process_index: int = 0, process_count: int = 1, num_workers: int = 8):
        import tensorflow_datasets as tfds
        try:
            if tf.io.gfile.exists(os.path.join(name, "dataset_info.json")):
                builder = tfds.builder_from_directory(name)
            else:
                builder = tfds.builder(name, data_dir=data_dir or None)
        except Exception as e:  # tfds raises several kinds for an unknown name or a broken directory
            raise ValueError(f"config.data.path={name!r} is not a TFDS dataset: {str(e).splitlines()[0]}") from e
        info = builder.info
        if split not in info.splits:
            raise ValueError(f"config.data.split={split!r}: TFDS dataset {name!r} has splits {list(info.splits)} in "
                             f"{builder.data_dir} (prepare it first, e.g. `tfds build {name}`)")
        if str(getattr(info.file_format, "value", info.file_format)) != "tfrecord":
            raise ValueError(f"TFDS dataset {name!r} is stored as {info.file_format}; only tfrecord is read here")
        for key in (video_key, label_key):
            if key not in info.features:
                raise ValueError(f"config.data.video_key/label_key: TFDS dataset {name!r} has no feature {key!r} "
                                 f"(it has {list(info.features)})")
        files = sorted(str(p) for p in info.splits[split].filepaths)
        super().__init__(host_files(files, f"TFDS dataset {name!r} split {split!r}", process_index, process_count),
                         num_workers)
        label_feature = info.features[label_key]
        dataset_classes = getattr(label_feature, "num_classes", None)
        if num_classes and dataset_classes and dataset_classes > num_classes:
            raise ValueError(f"TFDS dataset {name!r} has {dataset_classes} classes, more than "
                             f"config.data.num_classes={num_classes}")
        self.name, self.fps, self.num_classes = name, float(fps), num_classes
        self._features, self._video_key, self._label_key = info.features, video_key, label_key
        self._decoders = {video_key: tfds.decode.SkipDecoding()}

    def _parsed(self, index: int) -> records.ParsedVideo:
        def make():
            data = self.read(index)
            try:
                ex = self._features.deserialize_example(data, decoders=self._decoders)
            except READ_ERRORS as e:
                raise BadVideo(f"{self.where(index)}: {e}") from e
            video = ex[self._video_key].numpy()
            frames = list(video) if video.dtype == object else video  # encoded bytes, or decoded uint8
            return records.ParsedVideo(frames=frames, fps=self.fps, label=int(ex[self._label_key].numpy()),
                                       name=f"{self.name}:{self.where(index)}")
        return self._cache.get(index, make)

    def info(self, index: int) -> VideoInfo:
        p = self._parsed(index)
        if len(p.frames) < 1:
            raise BadVideo(f"{self.where(index)}: no frames")
        if self.num_classes and not 0 <= p.label < self.num_classes:
            raise ValueError(f"{self.where(index)} has label {p.label} outside [0, {self.num_classes}): "
                             f"{_LABEL_HINT}")
        return VideoInfo(len(p.frames), p.fps, p.label, p.name)

    def frames(self, index: int, frame_indices) -> np.ndarray:
        return _decode_frames(self._parsed(index).frames, frame_indices, self.where(index))


def make_real_source(config, process_index: int, process_count: int, class_names: list[str] | None = None):
    """The source named by config.data.source (not synthetic). Labels are checked against
    config.data.num_classes except in pre-training, which does not use them. class_names: how a
    `videos` list of class-name labels without its own classes.txt numbers them (read_list)."""
    d = config.data
    if not d.path:
        raise ValueError(f"config.data.source={d.source!r} needs config.data.path (tfrecord: a glob of shards; "
                         f"videos: a list file; tfds: a dataset name or directory)")
    num_classes = None if config.mode == "pretrain" else int(d.num_classes)
    workers = max(1, d.num_workers)
    if d.source == "tfrecord":
        source = TFRecordVideos(d.path, num_classes=num_classes, process_index=process_index,
                                process_count=process_count, num_workers=workers)
    elif d.source == "videos":
        short = int(d.get("decode_short_side", -1))
        if short < 0:
            from mae_st_jax.data.augment import jitter_min_scale
            short = jitter_min_scale(config.model.img_size)
        source = VideoFiles(d.path, num_classes=num_classes, class_names=class_names, short_side=short)
    elif d.source == "tfds":
        source = TFDSVideos(d.path, split=d.get("split", "train"), data_dir=d.get("data_dir", ""),
                            video_key=d.get("video_key", "video"), label_key=d.get("label_key", "label"),
                            fps=d.video_fps, num_classes=num_classes, process_index=process_index,
                            process_count=process_count, num_workers=workers)
    else:
        raise ValueError(f"config.data.source={d.source!r} is not a real video source")
    total = len(source) * (process_count if source.host_local else 1)
    if config.total_steps <= 0 and abs(total - d.num_videos) > 0.01 * max(total, 1):
        logging.warning("config.data.num_videos=%d but %s holds about %d videos: epochs (and so total steps "
                        "and warmup) are counted from config.data.num_videos", d.num_videos, d.path, total)
    logging.info("Data: %s source %s, %d videos on this process", d.source, d.path, len(source))
    return source
