"""Fine-tuning augmentation (RandAugment, random erasing), the multi-view test (view averaging, a run on
converted shards with its predictions file), the linear probe, and feature extraction (function + CLI)."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config_module
from mae_st_jax import evaluate, features
from mae_st_jax.data import augment, fake_videos, make_shards, pipeline, randaug
from mae_st_jax.models import VideoClassifier
from mae_st_jax.train import checkpoint, erasing, finetune, pretrain
from mae_st_jax.train.finetune import classifier_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finetune_config(c, **finetune_fields):
    c.mode = "finetune"
    c.data.flip = False
    c.data.num_eval_videos = 12
    c.eval_batch_size = 8
    c.optim.update(b2=0.999, decay_tokens=False, lr_counts_repeat_aug=True, min_lr=1e-6, clip_grad=5.0, lr=1e-3)
    c.finetune.update(finetune_fields)
    return c


# ----------------------------------------------------------------------------------------------
# RandAugment


def test_parse_rand_augment_spec():
    p = randaug.parse("rand-m7-mstd0.5-inc1")
    # fill: mae_st gives its rand_augment_transform no img_mean, so its ops fill with _FILL = 128 grey
    assert (p.magnitude, p.num_ops, p.magnitude_std, p.increasing, p.fill) == (7.0, 2, 0.5, True, (128, 128, 128))
    assert p.ops == randaug.INCREASING_OPS and len(p.ops) == 15
    q = randaug.parse("rand-m9-n3-mstd0-inc0")
    assert (q.magnitude, q.num_ops, q.magnitude_std, q.increasing) == (9.0, 3, 0.0, False)
    assert randaug.parse("") is None and randaug.parse("none") is None
    for bad in ("auto-m7", "rand-m7-x3", "rand-m11", "rand-n0"):
        with pytest.raises(ValueError):
            randaug.parse(bad)


@pytest.mark.parametrize("name,arg,expect", [
    ("Invert", None, lambda x: 255 - x),
    ("SolarizeIncreasing", 128, lambda x: np.where(x >= 128, 255 - x, x)),
    ("SolarizeAdd", 50, lambda x: np.where(x < 128, np.minimum(x.astype(int) + 50, 255), x)),
    ("PosterizeIncreasing", 2, lambda x: x & 0b11000000),
    ("BrightnessIncreasing", 0.5, lambda x: np.floor(x * 0.5 + 0.5)),  # PIL blends with black, rounds
])
def test_point_ops_match_hand_computation(name, arg, expect):
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    got = randaug.apply(x, [(name, arg)])
    np.testing.assert_allclose(got.astype(int), expect(x).astype(int), atol=1)


def test_same_op_and_magnitude_on_every_frame():
    """A clip of identical frames stays a clip of identical frames under every drawn transform, and
    the drawn transforms do change it (so the check has teeth)."""
    policy = randaug.parse("rand-m7-mstd0.5-inc1")
    frame = next(iter(fake_videos.shape_frames(1, 24, 32, seed=3)))
    clip = np.repeat(frame[None], 6, axis=0)
    changed = 0
    names = set()
    for seed in range(40):
        ops = randaug.sample(np.random.default_rng(seed), policy)
        names.update(n for n, _ in ops)
        out = randaug.apply(clip, ops, policy.fill)
        assert out.shape == clip.shape and out.dtype == np.uint8
        for t in range(1, len(out)):
            np.testing.assert_array_equal(out[t], out[0])
        changed += not np.array_equal(out, clip)
    assert changed >= 15  # each op fires with p 0.5: most of 40 clips change
    assert len(names) >= 10  # the draws cover the op set
    # magnitudes: Rotate within m=7 +- noise -> |deg| < 30 * 10 / 10, signs both ways
    rng = np.random.default_rng(0)
    degs = [a for _ in range(400) for n, a in randaug.sample(rng, policy) if n == "Rotate"]
    assert max(abs(d) for d in degs) <= 30.0 and min(degs) < 0 < max(degs)
    assert np.mean(np.abs(degs)) == pytest.approx(21.0, abs=1.0)  # 7 / 10 * 30


def test_loader_applies_rand_augment_deterministically(tiny_config):
    c = finetune_config(tiny_config)
    base = pipeline.ClipLoader(pipeline.make_source(c), c).batch(0)
    again = pipeline.ClipLoader(pipeline.make_source(c), c).batch(0)
    np.testing.assert_array_equal(base["video"], again["video"])  # a pure function of (seed, step, slot)
    c.finetune.rand_augment = ""
    plain = pipeline.ClipLoader(pipeline.make_source(c), c).batch(0)
    assert not np.array_equal(base["video"], plain["video"])
    c.mode = "pretrain"  # pre-training never augments with RandAugment
    c.finetune.rand_augment = "rand-m7-mstd0.5-inc1"
    assert pipeline.ClipLoader(pipeline.make_source(c), c).rand_aug is None


# ----------------------------------------------------------------------------------------------
# random erasing


def test_random_erasing_same_box_on_every_frame():
    b, t, h, w = 64, 4, 24, 32
    video = jnp.full((b, t, h, w, 3), 7.0)
    out = np.asarray(erasing.random_erase(jax.random.key(0), video, 1.0))
    erased = out != 7.0
    erased_px = erased.any(axis=-1)  # [b, t, h, w]
    for i in range(b):
        for k in range(1, t):
            np.testing.assert_array_equal(erased_px[i, k], erased_px[i, 0])
        ys, xs = np.nonzero(erased_px[i, 0])
        if len(ys) == 0:
            continue
        bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert erased_px[i, 0].sum() == bh * bw  # one solid rectangle
        assert bh < h and bw < w
        area = bh * bw / (h * w)
        assert 0.02 * 0.8 <= area <= (1 / 3) * 1.2  # U[0.02, 1/3] of the frame, up to rounding
    assert erased_px[:, 0].any(axis=(1, 2)).mean() > 0.9  # prob 1: nearly every clip gets a box
    noise = out[erased]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1.0) < 0.05  # N(0, 1) pixels
    # noise differs between frames (fresh per frame, as PySlowFast's cube erasing)
    i = int(np.argmax(erased_px[:, 0].sum(axis=(1, 2))))
    assert not np.array_equal(out[i, 0][erased[i, 0]], out[i, 1][erased[i, 1]])


def test_random_erasing_probability_and_identity():
    video = jnp.zeros((400, 2, 16, 16, 3))
    hit = np.asarray(erasing.random_erase(jax.random.key(1), video, 0.25) != 0).any(axis=(1, 2, 3, 4))
    assert 0.17 < hit.mean() < 0.33  # prob 0.25 per clip
    np.testing.assert_array_equal(np.asarray(erasing.random_erase(jax.random.key(1), video, 0.0)), 0.0)


def test_erase_boxes_invariants():
    apply, top, left, h, w = map(np.asarray, erasing.erase_boxes(jax.random.key(2), 2000, 20, 30, 1.0))
    assert apply.mean() > 0.95
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 20)[apply].all() and (left + w <= 30)[apply].all()
    aspect = h[apply] / w[apply]
    assert aspect.min() >= 0.3 * 0.5 and aspect.max() <= (1 / 0.3) * 2  # log-uniform [0.3, 1/0.3], rounded
    assert top[apply].min() == 0  # the full range of positions is used


# ----------------------------------------------------------------------------------------------
# multi-view test


def test_average_views_fixed_example():
    ln3 = np.log(3.0)
    logits = jnp.asarray([[[0.0, ln3], [ln3, 0.0]],  # video 0: views (0.25, 0.75) and (0.75, 0.25)
                          [[0.0, 0.0], [0.0, ln3]]])  # video 1: (0.5, 0.5) and (0.25, 0.75)
    np.testing.assert_allclose(np.asarray(evaluate.average_views(logits)), [[0.5, 0.5], [0.375, 0.625]],
                               rtol=1e-6)
    # averaging softmax is not softmax of the averaged logits: (1/3, 2/3)-style mistakes would show here
    probs = np.asarray(evaluate.average_views(jnp.asarray([[[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])))
    np.testing.assert_allclose(probs[0], [(np.exp(10) / (np.exp(10) + 2) + 1 / 3) / 2,
                                          (1 / (np.exp(10) + 2) + 1 / 3) / 2, (1 / (np.exp(10) + 2) + 1 / 3) / 2],
                               rtol=1e-6)


def test_summarize_per_class_fixed_example():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])
    labels = np.array([0, 1, 1, 1, 2])
    valid = np.array([True, True, True, True, False])
    r = evaluate.summarize(probs, labels, valid, 3)
    assert r["videos"] == 4
    assert r["top1"] == pytest.approx(2 / 4)  # videos 0 and 1
    assert r["top5"] == 1.0
    assert r["per_class_top1"] == {0: 1.0, 1: pytest.approx(1 / 3)}  # class 2's only video is invalid
    assert r["mean_class_top1"] == pytest.approx((1 + 1 / 3) / 2)


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    """Five converted videos (two sizes, one shorter than a clip) and a corrupt one, as TFRecord shards."""
    root = tmp_path_factory.mktemp("val")
    specs = [(48, 64, 40), (64, 48, 36), (48, 48, 6), (40, 64, 30), (48, 64, 44)]
    lines = []
    for k, (h, w, n) in enumerate(specs):
        fake_videos.write_video(str(root / f"v{k}.mp4"), fake_videos.shape_frames(n, h, w, seed=k, label=k % 3),
                                fps=30)
        lines.append(f"v{k}.mp4 {k % 3}")
    (root / "bad.mp4").write_bytes(b"\x00" * 3000)
    (root / "val.txt").write_text("\n".join(lines + ["bad.mp4 1"]) + "\n")
    summary = make_shards.convert(str(root / "val.txt"), str(root / "shards"), 2, short_side=36, workers=1)
    assert summary["written"] == 5 and summary["skipped"] == 1
    return root


def _classifier_checkpoint(c, path):
    model = finetune.build_model(c, nnx.Rngs(params=3))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))
    params["head"]["kernel"] = np.random.default_rng(0).normal(0, 0.5, params["head"]["kernel"].shape).astype(
        np.float32)  # a head that discriminates, so the views' softmaxes differ
    checkpoint.save_params(str(path), params, dict(kind="classifier", **classifier_kwargs(c)))
    return nnx.merge(nnx.split(model, nnx.Param)[0], jax.tree.map(jnp.asarray, params)), params


def test_multiview_evaluation_on_converted_shards(tiny_config, val_shards, tmp_path):
    c = finetune_config(tiny_config)
    c.mode = "evaluate"
    c.data.update(source="tfrecord", path="", eval_path=str(val_shards / "shards" / "*.tfrecord"), num_classes=3,
                  sampling_rate=2)
    c.test.update(temporal_views=2, spatial_views=3)
    c.init_from = str(tmp_path / "clf")
    model, params = _classifier_checkpoint(c, tmp_path / "clf")
    results = evaluate.run(c, str(tmp_path / "run"))
    out = tmp_path / "run" / "eval"
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 5 and results["videos"] == 5 and results["skipped"] == 0
    probs = np.load(out / "probs.npy")
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    saved = json.load(open(out / "results.json"))
    assert saved["top1"] == pytest.approx(np.mean([int(r["correct"]) for r in rows]))
    assert saved["top1"] == results["top1"] and 0 <= saved["top1"] <= saved["top5"] <= 1
    # video 0 by hand: its 2 x 3 views, the model's softmax, averaged
    source = evaluate.validation.make_eval_source(c, limit=False)
    views, label = evaluate.video_views(source, 0, c, 2, 3)
    assert views.shape == (6, c.model.num_frames, c.model.img_size, c.model.img_size, 3)
    assert int(rows[0]["label"]) == label
    x = (views.astype(np.float32) / 255 - np.asarray(c.data.mean)) / np.asarray(c.data.std)
    logits = np.asarray(model(jnp.asarray(x, jnp.float32), deterministic=True), np.float64)
    want = (np.exp(logits - logits.max(1, keepdims=True)) / np.exp(logits - logits.max(1, keepdims=True)).sum(
        1, keepdims=True)).mean(0)
    np.testing.assert_allclose(probs[0], want, rtol=1e-4, atol=1e-6)
    assert int(rows[0]["pred"]) == int(np.argmax(want))


def test_one_crop_view_is_the_centre_of_the_short_side_256_resize(tiny_config, val_shards):
    c = finetune_config(tiny_config)
    c.data.update(source="tfrecord", path="", eval_path=str(val_shards / "shards" / "*.tfrecord"), num_classes=3,
                  sampling_rate=2)
    source = evaluate.validation.make_eval_source(c, limit=False)
    size = c.model.img_size
    short = round(size * 256 / 224)
    views, _ = evaluate.video_views(source, 0, c, 1, 1)
    clip = source.frames(0, evaluate.sampling.test_clip(0, 1, source.info(0).num_frames, c.model.num_frames,
                                                        c.data.sampling_rate, source.info(0).fps, c.data.target_fps))
    assert min(clip.shape[1:3]) not in (size, short)  # the resize matters for this clip
    resized = augment.resize_short_side(clip, short)
    top, left = (resized.shape[1] - size + 1) // 2, (resized.shape[2] - size + 1) // 2
    np.testing.assert_array_equal(views[0], resized[:, top:top + size, left:left + size])


def test_head_bias_starts_as_pytorch_linear_default():
    model = VideoClassifier(num_classes=400, rngs=nnx.Rngs(0), embed_dim=256, depth=1, num_heads=4,
                            num_frames=4, img_size=32, patch_size=16, t_patch_size=2)
    bias = np.asarray(model.head.bias[...])
    bound = 1 / np.sqrt(256)
    assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.9 * bound
    assert bias.std() == pytest.approx(bound / np.sqrt(3), rel=0.15)  # uniform on [-bound, bound]


def test_evaluate_refuses_a_pretraining_checkpoint(tiny_config, tmp_path):
    pretrain.train(tiny_config, str(tmp_path / "pre"))
    c = finetune_config(tiny_config)
    c.mode = "evaluate"
    c.init_from = str(tmp_path / "pre")
    with pytest.raises(ValueError, match="without a classifier head"):
        evaluate.run(c, str(tmp_path / "run"))


# ----------------------------------------------------------------------------------------------
# linear probe and features


def test_linear_probe_moves_only_norm_and_head(tiny_config, tmp_path):
    pretrain.train(tiny_config, str(tmp_path / "pre"))
    c = finetune_config(tiny_config, linear_probe=True, mixup_prob=0.0, drop_path_rate=0.0, dropout_rate=0.0)
    c.init_from = str(tmp_path / "pre")
    c.total_steps = 2
    finetune.train(c, str(tmp_path / "probe"))
    before, _ = checkpoint.load_params(str(tmp_path / "pre"))
    after, _ = checkpoint.load_params(str(tmp_path / "probe"))
    for name in ("patch_embed", "blocks", "cls_token", "pos_embed_spatial"):
        for a, b in zip(jax.tree.leaves(after[name]), jax.tree.leaves(before[name])):
            np.testing.assert_array_equal(a, b)  # frozen (weight decay included)
    assert not np.array_equal(after["norm"]["scale"], before["norm"]["scale"])
    assert np.abs(after["head"]["kernel"]).max() > 0


def test_extract_features_matches_the_model(tiny_config, tmp_path):
    pretrain.train(tiny_config, str(tmp_path / "pre"))
    c = finetune_config(tiny_config)
    model = features.load_encoder(str(tmp_path / "pre"), c)
    before, _ = checkpoint.load_params(str(tmp_path / "pre"))
    np.testing.assert_array_equal(np.asarray(model.blocks[0].attn.q.kernel[...]), before["blocks"][0]["attn"]["q"]["kernel"])
    videos = pipeline.ClipLoader(pipeline.make_source(c), c, train=False).batch(0)["video"][0]
    got = features.extract(model, videos, c.data.mean, c.data.std)
    x = (videos.astype(np.float32) / 255 - np.asarray(c.data.mean)) / np.asarray(c.data.std)
    np.testing.assert_allclose(got, np.asarray(model.features(jnp.asarray(x, jnp.float32))), rtol=1e-5, atol=1e-5)
    assert got.shape == (len(videos), c.model.embed_dim) and np.isfinite(got).all()

    # a list with an unreadable file: its row is zeros, marked invalid, and named by its path
    for k in (0, 2):
        fake_videos.write_video(str(tmp_path / f"v{k}.mp4"), fake_videos.shape_frames(24, 40, 48, seed=k), fps=30)
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 2000)
    (tmp_path / "list.txt").write_text("v0.mp4 0\nbad.mp4 1\nv2.mp4 1\n")
    c.data.update(source="videos", path=str(tmp_path / "list.txt"), sampling_rate=2)
    feats, labels, valid, names = features.dataset_features(c, str(tmp_path / "pre"))
    np.testing.assert_array_equal(valid, [True, False, True])
    assert not feats[1].any() and feats[0].any() and feats[2].any()
    assert names[1] == str(tmp_path / "bad.mp4") and names[0] == str(tmp_path / "v0.mp4")


def test_features_cli_writes_npy(tiny_config, tmp_path):
    pretrain.train(tiny_config, str(tmp_path / "pre"))
    out = tmp_path / "feats"
    cmd = [sys.executable, "-m", "mae_st_jax.features", "--config=configs/finetune.py:demo",
           f"--init_from={tmp_path / 'pre'}", f"--output_dir={out}", "--max_videos=10", "--temporal_views=2",
           "--config.model.embed_dim=32", "--config.model.depth=2", "--config.model.num_heads=2",
           "--config.model.img_size=32", "--config.model.num_frames=4", "--config.data.video_frames=16",
           "--config.data.num_videos=64", "--config.data.num_workers=1"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    feats, labels = np.load(out / "features.npy"), np.load(out / "labels.npy")
    assert feats.shape == (10, 32) and feats.dtype == np.float32 and np.isfinite(feats).all()
    cli_config = load_config_module("finetune").get_config("demo")  # what the CLI saw
    cli_config.model.update(img_size=32, num_frames=4)
    cli_config.data.update(video_frames=16, num_videos=64)
    source = pipeline.make_source(cli_config)
    assert set(labels) <= set(range(cli_config.data.num_classes))
    np.testing.assert_array_equal(labels, [source.info(i).label for i in range(10)])
    assert np.load(out / "valid.npy").all()
    assert (out / "names.txt").read_text().split() == [source.info(i).name for i in range(10)]
    bad = subprocess.run(cmd[:4] + [f"--init_from={tmp_path / 'nope'}", f"--output_dir={out}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "features:" in bad.stderr and "Traceback" not in bad.stderr
