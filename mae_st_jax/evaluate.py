"""Multi-view test (`config.mode=evaluate`) and the view machinery the feature extractor shares.

Each video gives K = config.test.temporal_views uniformly spaced clips (sampling.test_clip) x S =
config.test.spatial_views crops (3: left/centre/right of the clip resized to short side img_size, which a
`videos` source decodes at directly; 1: the centre crop of the clip resized to short side img_size * 256 / 224,
as PySlowFast's one-crop test). The
classifier's softmax is averaged over the K x S views of a video; top-1 / top-5 / per-class accuracy
are computed over videos, and every video's prediction is written to `<workdir>/eval/predictions.csv`
(plus `probs.npy` and `results.json`). Unreadable videos are skipped, counted and listed.
"""

from __future__ import annotations

import concurrent.futures
import csv
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from mae_st_jax import config_lib, fileio
from mae_st_jax.data import augment, errors, pipeline, sampling, validation
from mae_st_jax.data.errors import BadVideo
from mae_st_jax.train import checkpoint, sharding as shd, step as step_lib


def video_views(source, index: int, config, temporal: int, spatial: int) -> tuple[np.ndarray, int]:
    """(uint8 [temporal * spatial, T, S, S, C], label): view k * spatial + s is clip k, crop s."""
    return errors.sampled_again_if_shorter(_video_views, source, index, config, temporal, spatial)


def _video_views(source, index: int, config, temporal: int, spatial: int) -> tuple[np.ndarray, int]:
    info = source.info(index)
    m, d = config.model, config.data
    clips = [sampling.test_clip(k, temporal, info.num_frames, m.num_frames, d.sampling_rate, info.fps, d.target_fps)
             for k in range(temporal)]
    frames = source.frames(index, np.concatenate(clips))  # one read for all K clips
    views = []
    for clip in np.split(frames, temporal):
        if spatial == 3:
            views.append(augment.test_crops(clip, m.img_size))
        else:
            # PySlowFast's one-crop test: short side to the train jitter's minimum (256 for 224), centre crop
            views.append(augment.center_crop(clip, m.img_size, augment.jitter_min_scale(m.img_size))[None])
    return np.concatenate(views), int(info.label)


def view_config(config, spatial: int):
    """`config` for reading test views: a `videos` source with decode_short_side -1 (auto) decodes the
    3-crop test's frames at short side img_size (the size the crops are cut at: one area resize from
    the file, instead of the training decode's 256 and a second, bilinear one to 224); otherwise `config`."""
    d = config.data
    if spatial != 3 or d.source != "videos" or int(d.get("decode_short_side", -1)) != -1:
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.decode_short_side = int(config.model.img_size)
    return config


def view_batches(source, config, videos_per_batch: int, temporal: int, spatial: int, *,
                 process_index: int = 0, process_count: int = 1, limit: int = 0):
    """Yield host batches {'video': uint8 [b, V, T, S, S, C], 'label', 'index', 'valid' [b]}.

    Global batch j holds videos j * videos_per_batch + [0, videos_per_batch); this process reads its
    column block. Padding rows (past the end) and unreadable videos have valid=False; an unreadable
    video is logged once and reported in 'bad' (its index) so callers can count it.
    """
    n = min(len(source), limit) if limit > 0 else len(source)
    per_host = videos_per_batch // process_count
    columns = np.arange(process_index * per_host, (process_index + 1) * per_host)
    shape = None

    def read(v: int):
        try:
            return video_views(source, v, config, temporal, spatial), None
        except BadVideo as e:
            errors.warn_once(source, v, "Skipping unreadable video %d in evaluation: %s", v, e)
            return None, v

    with concurrent.futures.ThreadPoolExecutor(max(1, config.data.num_workers)) as pool:
        for start in range(0, n, videos_per_batch):
            videos = start + columns
            in_range = videos < n
            results = list(pool.map(read, [int(v) for v in videos[in_range]]))
            got = [r for r, _ in results if r is not None]
            if shape is None and got:
                shape = got[0][0].shape
            if shape is None:  # nothing readable yet: read a later video just for the shape
                shape = _first_shape(source, config, temporal, spatial, n)
            video = np.zeros((len(videos),) + shape, np.uint8)
            label = np.zeros(len(videos), np.int32)
            valid = np.zeros(len(videos), bool)
            bad = []
            for row, (r, b) in zip(np.flatnonzero(in_range), results):
                if r is None:
                    bad.append(b)
                    continue
                video[row], label[row], valid[row] = r[0], r[1], True
            yield {"video": video, "label": label, "index": videos, "valid": valid, "bad": bad}


def _first_shape(source, config, temporal, spatial, n):
    for v in range(n):
        try:
            return video_views(source, v, config, temporal, spatial)[0].shape
        except BadVideo:
            continue
    raise RuntimeError("evaluation: none of the videos could be read (see the warnings above)")


def videos_per_batch(config, views: int, num_devices: int, process_count: int) -> int:
    """config.test.batch_videos, or eval_batch_size // views; rounded up to a multiple of the devices."""
    want = config.test.batch_videos or max(1, config_lib.eval_batch_size(config) // views)
    unit = math.lcm(num_devices, process_count)
    return int(math.ceil(want / unit) * unit)


def average_views(logits: jax.Array) -> jax.Array:
    """[b, V, K] view logits -> [b, K] probabilities: softmax per view, then the mean over views."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).mean(axis=1)


def view_batch_shardings(mesh) -> dict:
    split = functools.partial(shd.leading_batch_sharding, mesh)
    return {"video": split(6), "label": split(1), "valid": split(1)}


def make_view_step(graphdef, mesh, config, params_shardings, output: str = "probs"):
    """jit(fn)(params, video [b, V, T, H, W, C] uint8) -> replicated [b, K] mean softmax ('probs') or
    [b, E] mean pooled features ('features') over the V views."""
    mean, std = tuple(config.data.mean), tuple(config.data.std)

    def fn(params, video):
        model = nnx.merge(graphdef, params)
        b, v = video.shape[:2]
        clips = step_lib.normalize(video.reshape((b * v,) + video.shape[2:]), mean, std)
        if output == "features":
            return model.features(clips).reshape(b, v, -1).mean(axis=1)
        return average_views(model(clips, deterministic=True).reshape(b, v, -1))

    sh = view_batch_shardings(mesh)["video"]
    return jax.jit(fn, in_shardings=(params_shardings, sh), out_shardings=shd.replicated(mesh))


def run_views(step_fn, params, source, config, temporal: int, spatial: int, mesh, limit: int = 0):
    """(outputs [N, ...] for the N videos in order, labels [N], valid [N], this process's unreadable
    videos); outputs, labels and valid are whole on every process."""
    vb = videos_per_batch(config, temporal * spatial, jax.device_count(), jax.process_count())
    sh = view_batch_shardings(mesh)
    outputs, labels, valid, bad = [], [], [], []
    n = min(len(source), limit) if limit > 0 else len(source)
    for host in view_batches(source, config, vb, temporal, spatial, process_index=jax.process_index(),
                             process_count=jax.process_count(), limit=limit):
        glob = pipeline.to_global({k: host[k] for k in ("video", "label", "valid")}, sh)
        out = step_fn(params, glob["video"])
        outputs.append(np.asarray(jax.device_get(out)))
        labels.append(_gather(glob["label"]))
        valid.append(_gather(glob["valid"]))
        bad.extend(host["bad"])
    outputs, valid = np.concatenate(outputs)[:n], np.concatenate(valid)[:n]
    outputs[~valid] = 0  # an unreadable video's row (the model's output for a black clip) is zeros
    return outputs, np.concatenate(labels)[:n], valid, bad


def _gather(x: jax.Array) -> np.ndarray:
    """A batch-sharded global array, whole, on every process."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def summarize(probs: np.ndarray, labels: np.ndarray, valid: np.ndarray, num_classes: int) -> dict:
    """top-1 / top-5 over the valid videos, per-class top-1 and its mean (classes with videos only)."""
    probs, labels = probs[valid], labels[valid]
    k = min(5, num_classes)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(axis=1)
    per_class = {}
    for c in range(num_classes):
        sel = labels == c
        if sel.any():
            per_class[c] = float(hit1[sel].mean())
    n = max(len(labels), 1)
    return {"videos": int(len(labels)), "top1": float(hit1.sum() / n), "top5": float(hit5.sum() / n),
            "mean_class_top1": float(np.mean(list(per_class.values()))) if per_class else 0.0,
            "per_class_top1": per_class}


def load_classifier_params(config, path: str, abstract_params, shardings):
    """A fine-tuned classifier's params from `path` (our fine-tuning workdir, its param export, or an
    imported PyTorch fine-tuned checkpoint), placed on `shardings`; clear errors for other files."""
    params, saved = checkpoint.load_params(path)
    if "head" not in params:
        kind = saved.get("kind", "pre-training")
        raise ValueError(f"{path} holds a {kind} model without a classifier head: evaluate a fine-tuned "
                         f"checkpoint (config.mode=finetune with config.init_from={path} makes one)")
    step_lib.check_params_match(params, abstract_params)
    step_lib.check_saved_settings(saved, config.model, path)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), params, shardings)


def _name(source, i: int) -> str:
    try:
        return source.info(i).name
    except BadVideo:  # a listed file that cannot be read keeps its path; a bad record has no name to give
        paths = getattr(source, "paths", None)
        return str(paths[i]) if paths is not None and i < len(paths) else f"video_{i}"


def write_predictions(directory: str, source, probs, labels, valid, bad, results: dict) -> None:
    fileio.makedirs(directory)
    fileio.save_npy(os.path.join(directory, "probs.npy"), probs.astype(np.float32))
    k = min(5, probs.shape[1])
    with fileio.open_file(os.path.join(directory, "predictions.csv"), "w") as f:
        w = csv.writer(f)
        w.writerow(["index", "name", "label", "pred", "prob", "correct", "top5"])
        bad = set(bad)
        for i in range(len(probs)):
            name = _name(source, i)
            if not valid[i]:
                w.writerow([i, name, "", "", "", "skipped", ""])
                continue
            top = np.argsort(-probs[i], kind="stable")[:k]
            w.writerow([i, name, int(labels[i]), int(top[0]), f"{probs[i, top[0]]:.6f}",
                        int(top[0] == labels[i]), " ".join(str(int(t)) for t in top)])
    fileio.write_text(os.path.join(directory, "results.json"), json.dumps(results, indent=2, sort_keys=True))


def run(config, workdir: str) -> dict:
    """The multi-view test of config.init_from (default: the fine-tuning run in `workdir`)."""
    from mae_st_jax.train import finetune

    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = shd.make_mesh(config.mesh)
    path = config.init_from or workdir
    model_fn = lambda rngs: finetune.build_model(config, rngs)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_fn(nnx.Rngs(params=config.seed))), nnx.Param)
    abstract = nnx.to_pure_dict(abstract)
    shardings = shd.tree_shardings(abstract, mesh, config.param_sharding, config.sharding_rules,
                                   config.fsdp_min_size)
    params = load_classifier_params(config, path, abstract, shardings)
    t = config.test
    views = view_config(config, t.spatial_views)
    source = (validation.make_eval_source(views, limit=False) if t.split == "eval"
              else pipeline.make_source(views, 0, 1))
    logging.info("Multi-view test of %s: %d videos x %d temporal x %d spatial views", path, len(source),
                 t.temporal_views, t.spatial_views)
    step_fn = make_view_step(graphdef, mesh, config, shardings, "probs")
    probs, labels, valid, bad = run_views(step_fn, params, source, config, t.temporal_views, t.spatial_views, mesh)
    results = summarize(probs, labels, valid, config.data.num_classes)
    results.update(skipped=int((~valid).sum()), checkpoint=str(path), temporal_views=t.temporal_views,
                   spatial_views=t.spatial_views, split=t.split)
    out_dir = os.path.join(workdir, "eval")
    if jax.process_index() == 0:
        write_predictions(out_dir, source, probs, labels, valid, bad, results)
    logging.info("Multi-view test (%dx%d views, %d videos, %d skipped): top1 %.4f top5 %.4f mean-class top1 "
                 "%.4f; predictions in %s", t.temporal_views, t.spatial_views, results["videos"],
                 results["skipped"], results["top1"], results["top5"], results["mean_class_top1"], out_dir)
    return results
