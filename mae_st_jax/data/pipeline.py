"""Per-host batches of clips, deterministic in (seed, step), turned into global jax.Arrays.

Step s of the global batch has `batch_size` clip slots laid out [accum, micro]; slot g reads
video `order[s * videos_per_step + g // repeat_aug]` (a seeded permutation per epoch) and cuts
its own clip (temporal start, flip) from a generator seeded by (seed, step, slot). A host
reads only the slots of its own column block, so a resumed or multi-host run sees exactly the
clips one uninterrupted single-host run would have.
"""

import concurrent.futures
import queue
import threading

import jax
import numpy as np

from mae_st_jax.data import sampling
from mae_st_jax.data.synthetic import SyntheticVideos


def make_source(config):
    """The video source named by config.data.source."""
    d, m = config.data, config.model
    if d.source == "synthetic":
        return SyntheticVideos(num_videos=d.num_videos, num_classes=d.num_classes, num_frames=d.video_frames,
                               height=m.img_size, width=m.img_size, fps=d.video_fps, seed=config.seed)
    raise NotImplementedError(f"config.data.source={d.source!r} is not built yet: only 'synthetic' works in this "
                              f"version (real video sources are the next milestone)")


class ClipLoader:
    """Host-local batches {'video': uint8 [A, b, T, H, W, C], 'label': int32 [A, b]} for steps."""

    def __init__(self, source, config, *, process_index: int = 0, process_count: int = 1, train: bool = True):
        self.source, self.train = source, train
        self.seed = config.seed
        self.num_frames, self.sampling_rate = config.model.num_frames, config.data.sampling_rate
        self.target_fps = config.data.target_fps
        self.flip = config.data.flip and train
        self.repeat_aug = config.data.repeat_aug
        self.accum = config.grad_accum_steps
        self.micro = config.batch_size // self.accum
        self.videos_per_step = config.batch_size // self.repeat_aug
        per_host = self.micro // process_count
        self.columns = np.arange(process_index * per_host, (process_index + 1) * per_host)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, config.data.num_workers))
        self._orders: dict[int, np.ndarray] = {}

    def _video_index(self, position: int) -> int:
        n = len(self.source)
        epoch, offset = divmod(position, n)
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, 1, epoch]).permutation(n)}
        return int(self._orders[epoch][offset])

    def _clip(self, step: int, slot: int):
        video = self._video_index(step * self.videos_per_step + slot // self.repeat_aug)
        info = self.source.info(video)
        rng = np.random.default_rng([self.seed, 2, step, slot])
        idx = sampling.train_clip(rng, info.num_frames, self.num_frames, self.sampling_rate, info.fps,
                                  self.target_fps)
        frames = self.source.frames(video, idx)
        if self.flip and rng.random() < 0.5:
            frames = frames[:, :, ::-1]
        return frames, info.label

    def batch(self, step: int) -> dict:
        slots = [a * self.micro + c for a in range(self.accum) for c in self.columns]
        clips = list(self._pool.map(lambda s: self._clip(step, s), slots))
        video = np.stack([c[0] for c in clips]).reshape(self.accum, len(self.columns), *clips[0][0].shape)
        label = np.asarray([c[1] for c in clips], np.int32).reshape(self.accum, len(self.columns))
        return {"video": video, "label": label}

    def iterate(self, start_step: int, prefetch: int = 2):
        """Yield (step, host batch) from start_step on, `prefetch` batches ahead in a thread."""
        q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        stop = threading.Event()

        def worker():
            step = start_step
            while not stop.is_set():
                try:
                    item = (step, self.batch(step))
                except Exception as e:  # surfaced in the consumer
                    item = (step, e)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                step += 1

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            while True:
                step, item = q.get()
                if isinstance(item, Exception):
                    raise item
                yield step, item
        finally:
            stop.set()


def to_global(host_batch: dict, shardings: dict) -> dict:
    """Host-local numpy arrays -> global jax.Arrays (the process's slice of each sharded axis)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in host_batch.items()
            if k in shardings}
