"""Input-pipeline throughput: clips/s in total and per CPU core for one source and config.

  python benchmarks/input_pipeline.py --make_videos=/tmp/bench --num_videos=32   # 10 s 320x256 H.264 + shards
  python benchmarks/input_pipeline.py --source=tfrecord --path='/tmp/bench/shards/*.tfrecord'
  python benchmarks/input_pipeline.py --source=videos --path=/tmp/bench/videos/list.txt
  python benchmarks/input_pipeline.py --source=reference --path=/tmp/bench/videos/list.txt

Sources: tfrecord, videos (PyAV, seeking, only the sampled frames), tfds, synthetic, and
`reference`: PyAV decoding every frame of the video once and cutting its repeat_aug clips from it
(mae_st's pre-training loader). All run the same ClipLoader (sampling, random resized crop, flip,
batching) with --config (default: the ViT-B pre-training recipe: 16 frames at rate 4, 224 px,
repeat_aug 4). Per core = clips / CPU seconds of this process (all threads), which is robust to
other load on the machine; total = clips / wall seconds with --workers threads. Each of --repeats
runs warms up on one batch, then times --batches batches; the median run is printed.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from mae_st_jax.data import fake_videos, pipeline, sources, video_io

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                       "pretrain.py:vit_b"), "Config file (its data and model).")
flags.DEFINE_string("source", "tfrecord", "tfrecord | videos | reference | tfds | synthetic")
flags.DEFINE_string("path", "", "config.data.path for the source.")
flags.DEFINE_integer("batch_size", 32, "Clips per batch (global = this host here).")
flags.DEFINE_integer("workers", 0, "Loader threads (0: the number of CPU cores).")
flags.DEFINE_integer("batches", 3, "Timed batches per run.")
flags.DEFINE_integer("repeats", 3, "Runs; the median is reported.")
flags.DEFINE_string("make_videos", "", "Write --num_videos test videos, their list and shards here, then exit.")
flags.DEFINE_integer("num_videos", 32, "Videos for --make_videos.")
flags.DEFINE_integer("seconds", 10, "Length of each video for --make_videos.")


class WholeVideoDecode(sources.VideoFiles):
    """The reference's approach: decode every frame of the video with PyAV, then index the clips."""

    def frames(self, index, frame_indices):
        try:
            frames = np.stack(list(video_io.iter_frames(self.paths[index])[1]))
        except video_io.DECODE_ERRORS as e:
            raise sources.BadVideo(f"{self.paths[index]}: {e}") from e
        return frames[np.minimum(np.asarray(frame_indices), len(frames) - 1)]


def make_videos(root: str, num_videos: int, seconds: int) -> None:
    from mae_st_jax.data import make_shards
    videos = os.path.join(root, "videos")
    os.makedirs(videos, exist_ok=True)
    lines = []
    for i in range(num_videos):
        path = os.path.join(videos, f"v{i:03d}.mp4")
        if not os.path.exists(path):
            fake_videos.write_video(path, fake_videos.texture_frames(30 * seconds, 256, 320, seed=i), fps=30)
        lines.append(f"v{i:03d}.mp4 {i % 4}\n")
    with open(os.path.join(videos, "list.txt"), "w") as f:
        f.writelines(lines)
    sizes = [os.path.getsize(os.path.join(videos, f"v{i:03d}.mp4")) for i in range(num_videos)]
    kbps = np.mean(sizes) * 8 / seconds / 1e3
    print(f"{num_videos} videos of {seconds} s, 320x256 at 30 fps, H.264 {kbps:.0f} kbit/s in {videos}")
    make_shards.convert(os.path.join(videos, "list.txt"), os.path.join(root, "shards"), num_shards=4,
                        short_side=256, workers=os.cpu_count() or 1)


def run_once(config, source, seed: int) -> tuple[float, float, int]:
    config.seed = seed
    loader = pipeline.ClipLoader(source, config)
    loader.batch(0)  # warm up: thread pool, caches of file handles
    wall, cpu = time.perf_counter(), time.process_time()
    for step in range(1, FLAGS.batches + 1):
        loader.batch(step)
    return time.perf_counter() - wall, time.process_time() - cpu, FLAGS.batches * config.batch_size


def main(argv):
    del argv
    if FLAGS.make_videos:
        make_videos(FLAGS.make_videos, FLAGS.num_videos, FLAGS.seconds)
        return
    config = FLAGS.config
    config.data.source = "videos" if FLAGS.source == "reference" else FLAGS.source
    config.data.path = FLAGS.path
    config.batch_size = FLAGS.batch_size
    config.grad_accum_steps = 1
    config.data.num_workers = FLAGS.workers or os.cpu_count() or 1
    source = (WholeVideoDecode(FLAGS.path) if FLAGS.source == "reference"
              else pipeline.make_source(config, 0, 1))
    runs = [run_once(config, source, seed) for seed in range(FLAGS.repeats)]
    wall, cpu, clips = sorted(runs, key=lambda r: r[2] / r[1])[len(runs) // 2]
    try:
        with open("/proc/cpuinfo") as f:
            cpu_name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu_name = platform.processor()
    m = config.model
    print(f"machine: {cpu_name}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"clips: {m.num_frames} frames at rate {config.data.sampling_rate}, {m.img_size} px, repeat_aug "
          f"{config.data.repeat_aug}, batch {config.batch_size}, {config.data.num_workers} threads; median of "
          f"{len(runs)} runs of {FLAGS.batches} batches (per-core range "
          f"{min(r[2] / r[1] for r in runs):.1f}-{max(r[2] / r[1] for r in runs):.1f})")
    print(f"| {FLAGS.source} | {clips / wall:.1f} clips/s total | {clips / cpu:.1f} clips/s per core |")


if __name__ == "__main__":
    app.run(main)
