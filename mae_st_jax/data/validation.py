"""Held-out validation videos for fine-tuning: one clip per video (fixed jitter), padded global batches."""

import concurrent.futures

import numpy as np

from mae_st_jax import config_lib
from mae_st_jax.data import errors, sampling
from mae_st_jax.data.errors import BadVideo
from mae_st_jax.data import synthetic


class HeldOut:
    """Videos [start, start + count) of `source`, re-indexed from 0."""

    def __init__(self, source, start: int, count: int):
        if start < 0 or count < 1 or start + count > len(source):
            raise ValueError(f"held-out range [{start}, {start + count}) does not fit a source of {len(source)}")
        self.source, self.start, self.count = source, start, count

    def __len__(self) -> int:
        return self.count

    def _index(self, index: int) -> int:
        if not 0 <= index < self.count:
            raise IndexError(f"video index {index} out of range [0, {self.count})")
        return self.start + int(index)

    def info(self, index: int):
        return self.source.info(self._index(index))

    def frames(self, index: int, frame_indices) -> np.ndarray:
        return self.source.frames(self._index(index), frame_indices)


def make_eval_source(config, limit: bool = True):
    """The validation videos, or None when the config has none (config_lib.has_eval_data).

    Synthetic: num_eval_videos videos after the training ones (same seed, so the same distribution, but
    never seen in training). Real sources: every video at data.eval_path (tfds: split data.eval_split),
    the same list on every process (each reads its own rows of each batch); with `limit`, only the first
    num_eval_videos when that is > 0 (periodic validation on a subset).
    """
    d = config.data
    if not config_lib.has_eval_data(config):
        return None
    if d.source == "synthetic":
        full = synthetic.from_config(config, d.num_videos + d.num_eval_videos)
        return HeldOut(full, d.num_videos, d.num_eval_videos)
    from mae_st_jax.data import sources
    eval_config = config.copy_and_resolve_references()
    with eval_config.unlocked():
        eval_config.data.path, eval_config.data.split = d.eval_path, d.eval_split
        eval_config.mode = "finetune"  # labels are checked against num_classes
        eval_config.total_steps = max(1, config.total_steps)  # no epoch-size warning for the eval list
    # a validation list of class names without its own classes.txt is numbered as the training list
    class_names = sources.training_class_names(config) if d.source == "videos" else None
    source = sources.make_real_source(eval_config, process_index=0, process_count=1, class_names=class_names)
    if limit and 0 < d.num_eval_videos < len(source):
        source = HeldOut(source, 0, d.num_eval_videos)
    return source


def eval_clip(source, index: int, config):
    """(uint8 [T, H, W, C], label): mae_st's per-epoch validation clip (train-style random start and
    flip), drawn once per video from a generator seeded by (seed, video) so every evaluation agrees."""
    return errors.sampled_again_if_shorter(_eval_clip, source, index, config)


def _eval_clip(source, index: int, config):
    info = source.info(index)
    rng = np.random.default_rng([config.seed, 3, index])
    idx = sampling.train_clip(rng, info.num_frames, config.model.num_frames, config.data.sampling_rate,
                              info.fps, config.data.target_fps)
    frames = source.frames(index, idx)
    size = config.model.img_size
    if frames.shape[1:3] != (size, size):  # real videos: PySlowFast's val jitter (short side 256-320 at 224)
        from mae_st_jax.data import augment
        scales = (augment.jitter_min_scale(size), int(round(size * 320 / 224)))
        return augment.jitter_crop(rng, frames, size, scales, flip=config.data.flip), info.label
    if config.data.flip and rng.random() < 0.5:
        frames = frames[:, :, ::-1]
    return frames, info.label


def eval_batches(source, config, batch_size: int, *, process_index: int = 0, process_count: int = 1):
    """Yield host batches {'video': uint8 [b, T, H, W, C], 'label': int32 [b], 'valid': bool [b]}.

    Global batch j holds videos j * batch_size + [0, batch_size); this host reads its column block.
    The last batch is padded with copies of video 0 marked valid=False; an unreadable video is a blank
    clip marked valid=False.
    """
    n = len(source)
    per_host = batch_size // process_count
    columns = np.arange(process_index * per_host, (process_index + 1) * per_host)
    size = config.model.img_size
    blank = np.zeros((config.model.num_frames, size, size, 3), np.uint8)

    def read(v: int):
        try:
            return eval_clip(source, v, config)
        except BadVideo as e:  # counted as not valid (eval_skipped), logged once per video
            errors.warn_once(source, v, "Validation: skipping unreadable video %d: %s", v, e)
            return None

    with concurrent.futures.ThreadPoolExecutor(max(1, config.data.num_workers)) as pool:
        for start in range(0, n, batch_size):
            videos = start + columns
            in_range = videos < n
            clips = list(pool.map(read, [int(v) for v in np.where(in_range, videos, 0)]))
            valid = in_range & np.array([c is not None for c in clips])
            yield {"video": np.stack([c[0] if c is not None else blank for c in clips]),
                   "label": np.asarray([c[1] if c is not None else 0 for c in clips], np.int32), "valid": valid}

