"""Per-host batches of clips, deterministic in (seed, step), turned into global jax.Arrays.

Step s of the global batch has `batch_size` clip slots laid out [accum, micro]; slot g reads
video `order[s * videos_per_step + g // repeat_aug]` (a seeded permutation per epoch) and cuts
its own clip (temporal start, flip) from a generator seeded by (seed, step, slot). A host
reads only the slots of its own column block, so a resumed or multi-host run sees exactly the
clips one uninterrupted single-host run would have.

Sources that hold only this host's shards (`source.host_local`, e.g. tfrecord) instead map the
host's slots to positions in a per-host permutation seeded by (seed, process_index, epoch): still
a pure function of (seed, process_index, step). Real sources decode the repeat_aug clips of a
video in one call and get a random resized crop (augment.py) per clip. A video that cannot be
read is replaced by the next one in the order (at most MAX_SKIPS in a row) and counted in the
batch's `skipped`.
"""

import concurrent.futures
import functools
import math
import queue
import threading

import jax
import numpy as np

from mae_st_jax.data import errors, randaug, sampling
from mae_st_jax.data.errors import BadVideo, DataError
from mae_st_jax.data import synthetic

MAX_SKIPS = 16  # unreadable videos in a row before a batch gives up


def make_source(config, process_index: int | None = None, process_count: int | None = None):
    """The video source named by config.data.source (real sources: this process's share)."""
    d = config.data
    if d.source == "synthetic":
        return synthetic.from_config(config, d.num_videos)
    from mae_st_jax.data import sources
    return sources.make_real_source(config, jax.process_index() if process_index is None else process_index,
                                    jax.process_count() if process_count is None else process_count)


class ClipLoader:
    """Host-local batches {'video': uint8 [A, b, T, H, W, C], 'label': int32 [A, b]} for steps."""

    def __init__(self, source, config, *, process_index: int = 0, process_count: int = 1, train: bool = True):
        self.source, self.train = source, train
        self.seed = config.seed
        self.num_frames, self.sampling_rate = config.model.num_frames, config.data.sampling_rate
        self.target_fps = config.data.target_fps
        self.flip = config.data.flip and train
        self.real = hasattr(source, "host_local")  # sources.py sources; synthetic keeps its own path
        self.host_local = bool(getattr(source, "host_local", False))
        self.process_index = process_index
        crop = config.data.get("crop", "auto")
        self.crop = ("random_resized" if self.real else "none") if crop == "auto" else crop
        self.crop_area = tuple(config.data.get("crop_area", (0.5, 1.0)))
        self.crop_aspect = tuple(config.data.get("crop_aspect", (0.75, 4 / 3)))
        self.img_size = config.model.img_size
        # fine-tuning's RandAugment (one op draw per clip, all frames alike); pre-training has none
        spec = config.finetune.get("rand_augment", "") if config.mode == "finetune" and train else ""
        self.rand_aug = randaug.parse(spec)
        self.repeat_aug = config.data.repeat_aug
        self.accum = config.grad_accum_steps
        self.micro = config.batch_size // self.accum
        self.videos_per_step = config.batch_size // self.repeat_aug
        per_host = self.micro // process_count
        self.columns = np.arange(process_index * per_host, (process_index + 1) * per_host)
        self.per_host = per_host
        self.host_videos_per_step = math.ceil(self.accum * per_host / self.repeat_aug)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, config.data.num_workers))
        self._order = functools.lru_cache(maxsize=4)(self._make_order)
        self.skipped_total = 0  # clips replaced because their video could not be read

    def _make_order(self, epoch: int) -> np.ndarray:
        key = [self.seed, 4, self.process_index, epoch] if self.host_local else [self.seed, 1, epoch]
        return np.random.default_rng(key).permutation(len(self.source))

    def _video_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.source))
        return int(self._order(epoch)[offset])

    def _position(self, step: int, slot: int) -> int:
        """Place of slot's video in the (global or per-host) order."""
        if not self.host_local:
            return step * self.videos_per_step + slot // self.repeat_aug
        local = (slot // self.micro) * self.per_host + (slot % self.micro - int(self.columns[0]))
        return step * self.host_videos_per_step + local // self.repeat_aug

    def _clip(self, step: int, slot: int):
        video = self._video_index(self._position(step, slot))
        info = self.source.info(video)
        rng = np.random.default_rng([self.seed, 2, step, slot])
        idx = sampling.train_clip(rng, info.num_frames, self.num_frames, self.sampling_rate, info.fps,
                                  self.target_fps)
        frames = self.source.frames(video, idx)
        return self._augment(rng, frames), info.label

    def _augment(self, rng: np.random.Generator, frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if self.rand_aug is not None:  # before the crop, at the source resolution (mae_st order)
            frames = randaug.rand_augment(rng, frames, self.rand_aug)
        if self.crop == "random_resized" and self.train:
            from mae_st_jax.data import augment
            return augment.random_resized_crop(rng, frames, self.img_size, self.crop_area, self.crop_aspect,
                                               self.flip, out)
        if self.real:
            from mae_st_jax.data import augment
            frames = augment.center_crop(frames, self.img_size)
        if self.flip and rng.random() < 0.5:
            frames = frames[:, :, ::-1]
        if out is not None:
            out[...] = frames
            return out
        return frames

    def _group(self, step: int, position: int, slots: list[int], outs: list[np.ndarray]):
        """(labels of the slots of one video, clips skipped), their clips written into `outs`: one read
        for all its clips, the next video in the order in place of one that cannot be read."""
        for attempt in range(MAX_SKIPS):
            video = self._video_index(position + attempt)
            try:
                info = self.source.info(video)
                rngs = [np.random.default_rng([self.seed, 2, step, s]) for s in slots]
                idx = [sampling.train_clip(r, info.num_frames, self.num_frames, self.sampling_rate, info.fps,
                                           self.target_fps) for r in rngs]
                frames = self.source.frames(video, np.concatenate(idx))
            except BadVideo as e:
                errors.warn_once(self.source, video, "Skipping unreadable video %d (first at step %d): %s",
                                 video, step, e)
                continue
            for r, f, out in zip(rngs, np.split(frames, len(slots)), outs):
                self._augment(r, f, out)
            return [info.label] * len(slots), len(slots) if attempt else 0  # clips replaced, not tries
        raise DataError(f"step {step}: {MAX_SKIPS} videos in a row could not be read (the last: video {video}, "
                           f"see the warnings above); check the files at config.data.path")

    def batch(self, step: int) -> dict:
        slots = [a * self.micro + c for a in range(self.accum) for c in self.columns]
        skipped = 0
        if self.real:  # clips written straight into the batch, the clips of one video read together
            video = np.empty((len(slots), self.num_frames, self.img_size, self.img_size, 3), np.uint8)
            row = {s: k for k, s in enumerate(slots)}
            groups: dict[int, list[int]] = {}
            for s in slots:
                groups.setdefault(self._position(step, s), []).append(s)
            done = list(self._pool.map(lambda g: self._group(step, *g, [video[row[s]] for s in g[1]]),
                                       groups.items()))
            labels = [label for group, _ in done for label in group]
            skipped = sum(n for _, n in done)
            self.skipped_total += skipped
        else:
            clips = list(self._pool.map(lambda s: self._clip(step, s), slots))
            video = np.stack([c[0] for c in clips])
            labels = [c[1] for c in clips]
        video = video.reshape(self.accum, len(self.columns), *video.shape[1:])
        label = np.asarray(labels, np.int32).reshape(self.accum, len(self.columns))
        return {"video": video, "label": label, "skipped": np.int64(skipped)}

    def iterate(self, start_step: int, prefetch: int = 2, timeout_s: float = 0):
        """Yield (step, host batch) from start_step on, `prefetch` batches ahead in a thread; with
        `timeout_s` > 0, a DataError when no batch comes for that long (a read that never returns)."""
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
                waited = 0.0
                while True:
                    try:
                        step, item = q.get(timeout=1.0)
                        break
                    except queue.Empty:
                        waited += 1.0
                        if timeout_s and waited >= timeout_s:
                            raise DataError(
                                f"no batch for {timeout_s:g} s: a video read does not return (a FIFO or device "
                                f"in the list, a hung network mount?); config.data.read_timeout_s sets the "
                                f"limit") from None
                if isinstance(item, Exception):
                    raise item
                yield step, item
        finally:
            stop.set()


def to_global(host_batch: dict, shardings: dict) -> dict:
    """Host-local numpy arrays -> global jax.Arrays (the process's slice of each sharded axis)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in host_batch.items()
            if k in shardings}
