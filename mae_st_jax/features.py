"""Pooled encoder features: a function for notebooks and a CLI that writes a dataset's features to .npy.

    from mae_st_jax import features
    model = features.load_encoder("workdirs/demo", config)      # ours (pre-train / fine-tune) or imported
    feats = features.extract(model, videos_uint8, config.data.mean, config.data.std)   # [B, E]

    python -m mae_st_jax.features --config=configs/finetune.py:demo --init_from=workdirs/demo \\
        --output_dir=workdirs/demo_features [--split=train|eval] [--temporal_views=1] [--spatial_views=1]

A feature is the encoder's final-norm output of the mean over patch tokens (the classifier's input,
VideoClassifier.features), averaged over the requested views of each video. The CLI writes
features.npy [N, E] float32, labels.npy [N] int32, valid.npy [N] bool (False: unreadable video, its
features row zeros) and names.txt (an unreadable listed file by its path).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_st_jax import fileio
from mae_st_jax.models import VideoClassifier
from mae_st_jax.train import step as step_lib


def load_encoder(init_from: str, config) -> VideoClassifier:
    """A VideoClassifier (config.model's encoder) with its encoder (and final norm) from `init_from`;
    pos-embeds resized when the token grid differs. Its head is fresh: use `extract`, not the logits."""
    from mae_st_jax.train import finetune, warm_start

    model = finetune.build_model(config, nnx.Rngs(params=config.seed))
    graphdef, state = nnx.split(model, nnx.Param)
    fresh = nnx.to_pure_dict(state)
    encoder = warm_start.load_encoder_params(init_from, fresh, config.model,
                                             interpolate=config.finetune.interpolate_pos_embed)
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, dict(fresh, **encoder)))


@nnx.jit
def _features(model, video, mean, std):
    return model.features(step_lib.normalize(video, mean, std))


def extract(model: VideoClassifier, videos, mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225)) -> np.ndarray:
    """float32 [B, E] pooled features of uint8 (or float 0-255) videos [B, T, H, W, C] at the model's size."""
    videos = jnp.asarray(videos)
    if videos.ndim != 5:
        raise ValueError(f"videos must be [B, T, H, W, C], got shape {videos.shape}")
    return np.asarray(_features(model, videos, tuple(mean), tuple(std)))


def dataset_features(config, init_from: str, split: str = "train", temporal_views: int = 1,
                     spatial_views: int = 1, limit: int = 0):
    """(features [N, E], labels [N], valid [N], names) for every video of the split (sharded over devices)."""
    from mae_st_jax import evaluate
    from mae_st_jax.data import pipeline, validation
    from mae_st_jax.train import sharding as shd

    mesh = shd.make_mesh(config.mesh)
    model = load_encoder(init_from, config)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    shardings = shd.tree_shardings(params, mesh, config.param_sharding, config.sharding_rules,
                                   config.fsdp_min_size)
    params = jax.tree.map(jax.device_put, params, shardings)
    config = evaluate.view_config(config, spatial_views)
    if split == "eval":
        source = validation.make_eval_source(config, limit=False)
        if source is None:
            raise ValueError("--split=eval: the config has no validation videos (data.eval_path / num_eval_videos)")
    elif split == "train":
        source = pipeline.make_source(config, 0, 1)
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    step_fn = evaluate.make_view_step(graphdef, mesh, config, shardings, "features")
    feats, labels, valid, _ = evaluate.run_views(step_fn, params, source, config, temporal_views, spatial_views,
                                                 mesh, limit=limit)
    names = [evaluate._name(source, i) for i in range(len(feats))]
    return feats.astype(np.float32), labels.astype(np.int32), valid, names


def main(argv):
    from absl import flags, logging

    from mae_st_jax import config_lib, distributed

    FLAGS = flags.FLAGS
    del argv
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    config = FLAGS.config
    try:
        if FLAGS.spatial_views not in (1, 3) or FLAGS.temporal_views < 1:
            raise ValueError(f"--spatial_views={FLAGS.spatial_views} must be 1 or 3 and --temporal_views="
                             f"{FLAGS.temporal_views} >= 1")
        config_lib.validate(config, jax.device_count(), jax.process_count())
        feats, labels, valid, names = dataset_features(config, FLAGS.init_from, FLAGS.split, FLAGS.temporal_views,
                                                       FLAGS.spatial_views, FLAGS.max_videos)
    except (config_lib.ConfigError, ValueError, FileNotFoundError) as e:
        sys.exit(f"features: {e}")
    if jax.process_index() == 0:
        fileio.makedirs(FLAGS.output_dir)
        for name, array in (("features", feats), ("labels", labels), ("valid", valid)):
            fileio.save_npy(os.path.join(FLAGS.output_dir, f"{name}.npy"), array)
        fileio.write_text(os.path.join(FLAGS.output_dir, "names.txt"), "\n".join(names) + "\n")
    logging.info("Wrote features %s of %d videos (%d unreadable) to %s", feats.shape, len(feats),
                 int((~valid).sum()), FLAGS.output_dir)


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config whose model and data describe the encoder and videos, "
                                    "e.g. configs/finetune.py:demo.", lock_config=False)
    flags.DEFINE_string("init_from", None, "Pre-training or fine-tuning workdir, or an imported checkpoint dir.")
    flags.DEFINE_string("output_dir", None, "Where features.npy, labels.npy, valid.npy and names.txt go.")
    flags.DEFINE_enum("split", "train", ["train", "eval"], "Training videos or the validation set.")
    flags.DEFINE_integer("temporal_views", 1, "Uniformly spaced clips per video (features averaged).")
    flags.DEFINE_integer("spatial_views", 1, "1: centre crop; 3: left/centre/right crops.")
    flags.DEFINE_integer("max_videos", 0, "Only the first N videos (0: all).")
    from mae_st_jax import distributed

    distributed.define_flags()
    flags.mark_flags_as_required(["config", "init_from", "output_dir"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    from mae_st_jax import config_lib

    app.run(main, flags_parser=config_lib.parse_flags)
