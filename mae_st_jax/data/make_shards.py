"""Videos -> TFRecord shards of SequenceExamples (records.py names the fields), in parallel.

  python -m mae_st_jax.data.make_shards --csv=train.csv --output_dir=DIR --num_shards=64 \\
      [--short_side=256] [--fps=F] [--workers=W] [--jpeg_quality=90]

--csv is a list file (`path label` per line, space or comma separated, labels ints or class names)
or a folder of class folders. Videos are spread over the shards in a fixed shuffled order, decoded
with PyAV, resized to the short side, resampled to --fps when given and stored as JPEG frames.
Writes DIR/PREFIX-SSSSS-of-NNNNN.tfrecord (+ .index.json beside each), DIR/classes.txt for named
classes and DIR/PREFIX-skipped.txt (`path<TAB>reason` for every video of this list left out; one
file per list, so converting val after train into one folder keeps train's). A shard is written under
a temporary name and renamed when complete, so a rerun skips the complete ones.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time

import numpy as np
from absl import app, flags, logging

from mae_st_jax.data import augment, records, sources, video_io

_PROGRESS = None  # a worker's queue for one message per finished video


def record_names(paths: list[str]) -> list[str]:
    """Each video's record name (what predictions.csv and names.txt call it): the file name without its
    extension; when two listed videos share one (clip_001.mp4 in several class folders), every name is
    the path below the folder they all share, without the extension (`jump/clip_001`), or with it when
    that still repeats (x.mp4 beside x.webm). A video listed twice keeps one name."""
    stems = [os.path.splitext(p.rstrip("/").rsplit("/", 1)[-1])[0] for p in paths]
    if len(set(stems)) == len(set(paths)):
        return stems
    parts = [p.split("/") for p in paths]
    shared = 0  # how many leading folders every path has in common
    while all(len(q) > shared + 1 and q[shared] == parts[0][shared] for q in parts):
        shared += 1
    logging.info("Some listed videos share a file name: each record is named by its path below %s",
                 "/".join(parts[0][:shared]) or "the current folder")
    relative = ["/".join(q[shared:]) for q in parts]
    names = [os.path.splitext(r)[0] for r in relative]
    return names if len(set(names)) == len(set(relative)) else relative


def convert_video(path: str, label: int, label_name: str, short_side: int = 256, fps: float = 0.0,
                  quality: int = 90, name: str = "") -> tuple[bytes, dict]:
    """(serialized SequenceExample, index metadata) of one video (its record named `name`, by default the
    file name without its extension); raises ValueError with the reason."""
    import tensorflow as tf
    if not tf.io.gfile.exists(path):
        raise ValueError("missing file")
    jpegs, shape, source_fps = [], None, video_io.DEFAULT_FPS
    try:
        source_fps, frames = _open(path, short_side, fps)
        for frame in frames:
            jpegs.append(records.encode_jpeg(frame, quality))
            shape = frame.shape
    except video_io.DECODE_ERRORS as e:
        if not jpegs:
            raise ValueError(f"undecodable: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        logging.warning("%s: decoding stopped after %d frames (%s); keeping them", path, len(jpegs), e)
    if not jpegs:
        raise ValueError("no frames decoded")
    rate = fps or source_fps
    name = name or os.path.splitext(os.path.basename(path))[0]
    data = records.encode_video(jpegs, fps=rate, label=label, label_name=label_name, path=path, name=name,
                                height=shape[0], width=shape[1])
    return data, {"num_frames": len(jpegs), "fps": rate, "label": label, "name": name}


def _open(path: str, short_side: int, fps: float):
    """(source fps, frame generator) with the output size worked out from the stream's size."""
    with video_io.open_container(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        h, w = stream.codec_context.height, stream.codec_context.width
    if short_side and h and w and min(h, w) != short_side:
        h, w = augment.short_side_size(h, w, short_side)
        return video_io.iter_frames(path, fps, width=w, height=h)
    return video_io.iter_frames(path, fps)


def _init_worker(progress):
    global _PROGRESS
    _PROGRESS = progress


def write_shard(task: dict) -> dict:
    """Write one shard (temporary name, then renamed) and its index; returns its index."""
    import tensorflow as tf
    final = task["path"]
    tmp = f"{final}.tmp-{os.getpid()}"
    offsets, lengths, meta, skipped = [], [], [], []
    pos = 0
    with tf.io.TFRecordWriter(tmp) as writer:
        for path, label, label_name, name in task["videos"]:
            try:
                data, info = convert_video(path, label, label_name, task["short_side"], task["fps"],
                                           task["quality"], name)
            except ValueError as e:
                skipped.append([path, str(e)])
                data = None
            if data is not None:
                writer.write(data)
                offsets.append(pos + 12)
                lengths.append(len(data))
                meta.append(info)
                pos += 12 + len(data) + 4
            if _PROGRESS is not None:
                _PROGRESS.put(data is None)
    index = {"file_size": pos, "offsets": offsets, "lengths": lengths,
             "num_frames": [m["num_frames"] for m in meta], "fps": [m["fps"] for m in meta],
             "labels": [m["label"] for m in meta], "names": [m["name"] for m in meta], "skipped": skipped}
    records.write_index(final, index)  # beside the final name; used once the shard is renamed into place
    tf.io.gfile.rename(tmp, final, overwrite=True)
    return index


def _bar(done: int, total: int, skipped: int, rate: float) -> str:
    filled = int(30 * done / max(total, 1))
    eta = (total - done) / rate if rate > 0 else float("nan")
    eta_text = time.strftime("%Hh%Mm%Ss", time.gmtime(eta)) if np.isfinite(eta) else "?"
    return (f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} videos ({100 * done / max(total, 1):.0f}%), "
            f"{skipped} skipped, {rate:.2f} videos/s, ETA {eta_text}")


def convert(csv: str, output_dir: str, num_shards: int, short_side: int = 256, fps: float = 0.0,
            workers: int = 1, jpeg_quality: int = 90, prefix: str = "", log_every_s: float = 10.0) -> dict:
    """Convert the videos of a list file or class folder; returns {'videos', 'written', 'skipped',
    'shards', 'shards_reused'}."""
    import tensorflow as tf
    if num_shards < 1:
        raise ValueError(f"--num_shards={num_shards} must be >= 1")
    # one numbering per output folder: a second list (val after train) of class names without its own
    # classes.txt is numbered by the classes.txt the first one wrote there
    classes_out = os.path.join(output_dir, "classes.txt")
    known = (sources.read_class_names(classes_out) or None) if tf.io.gfile.exists(classes_out) else None
    if tf.io.gfile.isdir(csv):
        paths, labels, names = sources.list_folder(csv)
    else:
        paths, labels, names = sources.read_list(csv, known, f"{classes_out} (written by an earlier conversion)")
    if names and known and names != known and set(names) <= set(known):  # a class folder missing a class
        lookup = {n: i for i, n in enumerate(known)}
        labels, names = [lookup[names[l]] for l in labels], known
    if names and known and names != known:
        raise ValueError(f"{csv}'s classes ({len(names)}, first {names[0]!r}) are not those of {classes_out} "
                         f"({len(known)}, first {known[0]!r}) that an earlier conversion wrote: convert into another "
                         f"--output_dir, or put the same classes.txt beside both lists")
    if num_shards > len(paths):
        logging.warning("--num_shards=%d is more than the %d videos: some shards will be empty", num_shards,
                        len(paths))
    tf.io.gfile.makedirs(output_dir)
    if names and not known:
        with tf.io.gfile.GFile(classes_out, "w") as f:
            f.write("".join(n + "\n" for n in names))
    prefix = prefix or os.path.splitext(os.path.basename(csv.rstrip("/")))[0] or "shard"
    order = np.random.default_rng(0).permutation(len(paths))  # mixes classes across shards
    record = record_names(list(paths))
    tasks, reused = [], []
    for s in range(num_shards):
        path = os.path.join(output_dir, f"{prefix}-{s:05d}-of-{num_shards:05d}.tfrecord")
        videos = [(paths[i], int(labels[i]), names[labels[i]] if names and labels[i] >= 0 else "", record[i])
                  for i in order[s::num_shards]]
        if tf.io.gfile.exists(path) and tf.io.gfile.exists(path + records.INDEX_SUFFIX):
            with tf.io.gfile.GFile(path + records.INDEX_SUFFIX, "r") as f:
                reused.append(json.load(f))
        else:
            tasks.append(dict(path=path, videos=videos, short_side=short_side, fps=fps, quality=jpeg_quality))
    done = sum(len(ix["offsets"]) + len(ix.get("skipped", [])) for ix in reused)
    if reused:
        logging.info("%d of %d shards are already complete in %s; converting the other %d", len(reused),
                     num_shards, output_dir, len(tasks))
    results, skipped_now, start, last_log = [], 0, time.time(), 0.0
    total = len(paths)
    if workers <= 1 or len(tasks) <= 1:
        converted_now = 0
        for task in tasks:
            results.append(write_shard(task))
            converted_now += len(task["videos"])
            skipped_now += len(results[-1]["skipped"])
            logging.info("%s", _bar(done + converted_now, total, skipped_now,
                                    converted_now / max(time.time() - start, 1e-9)))
        done += converted_now
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with TF / JAX threads
        progress = ctx.Queue()
        with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(progress,)) as pool:
            pending = pool.map_async(write_shard, tasks, chunksize=1)
            converted_now = 0
            while True:
                try:
                    was_skipped = progress.get(timeout=0.5)
                    converted_now += 1
                    skipped_now += bool(was_skipped)
                except queue.Empty:
                    if pending.ready():
                        break
                now = time.time()
                if now - last_log >= log_every_s:
                    last_log = now
                    logging.info("%s", _bar(done + converted_now, total, skipped_now,
                                            converted_now / max(now - start, 1e-9)))
            results = pending.get()
            done += converted_now
    skipped = [entry for ix in reused + results for entry in ix.get("skipped", [])]
    skipped_file = f"{prefix}-skipped.txt"
    with tf.io.gfile.GFile(os.path.join(output_dir, skipped_file), "w") as f:
        f.write("".join(f"{p}\t{reason}\n" for p, reason in sorted(skipped)))
    written = sum(len(ix["offsets"]) for ix in reused + results)
    elapsed = time.time() - start
    logging.info("Done in %.0f s: %d videos converted now (%.2f videos/s)", elapsed,
                 sum(len(t["videos"]) for t in tasks), sum(len(t["videos"]) for t in tasks) / max(elapsed, 1e-9))
    logging.info("Wrote %d videos in %d shards to %s; %d skipped (see %s)", written, num_shards,
                 output_dir, len(skipped), skipped_file)
    return {"videos": total, "written": written, "skipped": len(skipped), "shards": num_shards,
            "shards_reused": len(reused)}


def define_flags():
    """The CLI flags (defined only when run as a program, so importing this module defines none)."""
    flags.DEFINE_string("csv", None, "List file (`path label` per line) or a folder of class folders.")
    flags.DEFINE_string("output_dir", None, "Where the shards go (local or gs://).")
    flags.DEFINE_integer("num_shards", None, "Number of shard files (at least the number of training hosts).")
    flags.DEFINE_integer("short_side", 256, "Resize frames so the shorter side is this (0: keep the size).")
    flags.DEFINE_float("fps", 0.0, "Resample to this frame rate (0: keep the video's).")
    flags.DEFINE_integer("workers", os.cpu_count() or 1, "Parallel worker processes.")
    flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of the stored frames.")
    flags.DEFINE_string("prefix", "", "Shard file name prefix (default: the list's file name).")
    flags.mark_flags_as_required(["csv", "output_dir", "num_shards"])


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        convert(f.csv, f.output_dir, f.num_shards, f.short_side, f.fps, f.workers, f.jpeg_quality, f.prefix)
    except ValueError as e:
        raise SystemExit(f"make_shards: {e}") from e


if __name__ == "__main__":
    define_flags()
    app.run(main)
