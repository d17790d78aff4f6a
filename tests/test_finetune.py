"""Fine-tuning: layer-decay scales, Mixup/CutMix against hand computations, soft-target loss,
pos-embed resizing, init_from, validation with padded batches, and the end-to-end loop with resume."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, load_config_module
from mae_st_jax import config_lib
from mae_st_jax.data import pipeline, validation
from mae_st_jax.models import MaskedAutoencoder, VideoClassifier
from mae_st_jax.train import checkpoint, finetune, finetune_step, mixup, optim, pretrain, warm_start
from mae_st_jax.train import sharding as shd, step as step_lib
from mae_st_jax.train.logging import read_metrics

# ----------------------------------------------------------------------------------------------
# helpers


def finetune_config(c, **finetune):
    """tiny_config (a pre-training config) turned into a fine-tuning one."""
    c.mode = "finetune"
    c.data.flip = False
    c.data.num_eval_videos = 12  # eval batch 8: the second batch is padded with 4 invalid entries
    c.eval_batch_size = 8
    c.optim.update(b2=0.999, decay_tokens=False, lr_counts_repeat_aug=True, min_lr=1e-6, clip_grad=5.0, lr=1e-3)
    c.finetune.update(finetune)
    return c


def abstract_classifier_params(depth=3):
    model = nnx.eval_shape(lambda: VideoClassifier(num_classes=5, embed_dim=16, depth=depth, num_heads=2,
                                                   patch_size=8, img_size=16, num_frames=4, rngs=nnx.Rngs(0)))
    return nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])


def numpy_smooth(labels, k, eps):
    out = np.full((len(labels), k), eps / k, np.float64)
    out[np.arange(len(labels)), labels] = 1 - eps + eps / k
    return out


# ----------------------------------------------------------------------------------------------
# layer-wise lr decay


def test_layer_decay_scales_follow_the_formula_for_every_parameter():
    depth, decay = 3, 0.7
    params = abstract_classifier_params(depth)
    scales = optim.layer_decay_scales(params, depth, decay)
    num_layers = depth + 1
    seen = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        scale = np.asarray(_get(scales, path))
        top = path[0].key
        seen.add(top)
        if top == "blocks":  # block i has layer_id i + 1
            i = path[1].key
            assert 0 <= i < depth and scale.shape == (), name
            assert scale.item() == pytest.approx(decay ** (num_layers - (i + 1)), rel=1e-6), name
        elif top in ("patch_embed", "cls_token") or top.startswith("pos_embed"):
            assert scale.item() == pytest.approx(decay ** num_layers, rel=1e-6), name  # layer_id 0
        else:
            assert top in ("norm", "head"), name
            assert scale.item() == 1.0, name  # layer_id num_layers
    assert seen == {"patch_embed", "cls_token", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class",
                    "blocks", "norm", "head"}


def _get(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_layer_decay_scales_the_adamw_update_including_weight_decay(tiny_config):
    c = finetune_config(tiny_config)
    c.optim.clip_grad = 0.0
    depth, decay = 3, 0.5
    params = jax.tree.map(lambda s: jnp.full(s.shape, 0.3, s.dtype), abstract_classifier_params(depth))
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.01, p.dtype), params)
    scales = optim.layer_decay_scales(params, depth, decay)
    plain, _ = optim.make_optimizer(c, 100, 0)
    scaled, _ = optim.make_optimizer(c, 100, 0, lr_scales=scales)
    u_plain, _ = plain.update(grads, plain.init(params), params)
    u_scaled, _ = scaled.update(grads, scaled.init(params), params)
    for up, us, s in zip(jax.tree.leaves(u_plain), jax.tree.leaves(u_scaled), jax.tree.leaves(scales)):
        np.testing.assert_allclose(np.asarray(us), np.asarray(up) * np.broadcast_to(s, up.shape), rtol=1e-6)
    # block 0's q kernel: decay ** depth times the unscaled update (Adam's first step is -lr * (sign + wd * p))
    q_plain = np.asarray(u_plain["blocks"][0]["attn"]["q"]["kernel"])
    q_scaled = np.asarray(u_scaled["blocks"][0]["attn"]["q"]["kernel"])
    np.testing.assert_allclose(q_scaled, q_plain * decay ** depth, rtol=1e-6)
    np.testing.assert_allclose(q_plain, -1e-3 * (1.0 + 0.05 * 0.3), rtol=1e-4)
    last = np.asarray(u_scaled["blocks"][depth - 1]["attn"]["q"]["kernel"])  # the last block: decay ** 1
    np.testing.assert_allclose(last, q_plain * decay, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Mixup / CutMix


def test_smooth_targets():
    t = np.asarray(mixup.smooth_targets(jnp.array([2, 0]), 4, 0.1))
    np.testing.assert_allclose(t, [[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]], rtol=1e-6)
    np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("lam,cy,cx,box,lam_out", [
    (0.64, 1, 8, (0, 4, 5, 10), 0.8),  # side 0.6 * 10 = 6: clipped at the top and right edges
    (0.75, 5, 5, (3, 7, 3, 7), 0.84),  # side 5: an odd cut loses a pixel (cut // 2 on each side), as timm
    (1.0, 4, 4, (4, 4, 4, 4), 1.0),  # no box
])
def test_cutmix_box_hand_computed(lam, cy, cx, box, lam_out):
    got_box, got_lam = mixup.cutmix_box(jnp.float32(lam), jnp.int32(cy), jnp.int32(cx), 10, 10)
    assert tuple(np.asarray(got_box)) == box
    assert float(got_lam) == pytest.approx(lam_out, abs=1e-6)


def _video(b=4, t=3, h=10, w=12, c=2, seed=0):
    return np.random.default_rng(seed).normal(size=(b, t, h, w, c)).astype(np.float32)


def _draws(key, alpha_mixup, alpha_cutmix, h, w):
    """The documented key use of mixup.sample_mix, drawn directly."""
    _, _, k_mixup, k_cutmix, k_y, k_x = jax.random.split(key, 6)
    return (float(jax.random.beta(k_mixup, alpha_mixup, alpha_mixup)),
            float(jax.random.beta(k_cutmix, alpha_cutmix, alpha_cutmix)),
            int(jax.random.randint(k_y, (), 0, h)), int(jax.random.randint(k_x, (), 0, w)))


def test_mixup_matches_numpy():
    x, labels = _video(), np.array([0, 3, 1, 1])
    key = jax.random.key(7)
    mixed, targets, lam, box = mixup.mix_batch(key, jnp.asarray(x), jnp.asarray(labels), 5, mixup_alpha=0.8,
                                               cutmix_alpha=1.0, switch_prob=0.0, label_smoothing=0.1)
    lam_mix, _, _, _ = _draws(key, 0.8, 1.0, 10, 12)
    assert float(lam) == pytest.approx(lam_mix, rel=1e-6)
    assert 0.0 < lam_mix < 1.0
    np.testing.assert_array_equal(np.asarray(box), [0, 0, 0, 0])
    np.testing.assert_allclose(np.asarray(mixed), lam_mix * x + (1 - lam_mix) * x[::-1], rtol=1e-5, atol=1e-6)
    y = numpy_smooth(labels, 5, 0.1)
    np.testing.assert_allclose(np.asarray(targets), lam_mix * y + (1 - lam_mix) * y[::-1], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(targets).sum(1), 1.0, rtol=1e-6)


def test_cutmix_matches_numpy_with_the_same_box_on_every_frame():
    x, labels = _video(), np.array([4, 2, 2, 0])
    h, w = x.shape[2:4]
    for seed in range(20):  # the first key whose box is neither empty nor the whole frame
        key = jax.random.key(seed)
        _, lam_raw, cy, cx = _draws(key, 0.8, 1.0, h, w)
        cut_h, cut_w = int(h * np.sqrt(1 - lam_raw)), int(w * np.sqrt(1 - lam_raw))
        y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
        x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
        area = (y1 - y0) * (x1 - x0)
        if 0 < area < h * w:
            break
    mixed, targets, lam, box = mixup.mix_batch(key, jnp.asarray(x), jnp.asarray(labels), 5, mixup_alpha=0.8,
                                               cutmix_alpha=1.0, switch_prob=1.0, label_smoothing=0.1)
    np.testing.assert_array_equal(np.asarray(box), [y0, y1, x0, x1])
    lam_true = 1 - area / (h * w)  # corrected to the clipped box's area
    assert float(lam) == pytest.approx(lam_true, rel=1e-6)
    expected = x.copy()
    expected[:, :, y0:y1, x0:x1] = x[::-1][:, :, y0:y1, x0:x1]
    np.testing.assert_array_equal(np.asarray(mixed), expected)
    changed = np.any(np.asarray(mixed) != x, axis=-1)  # [B, T, H, W]
    in_box = np.zeros((h, w), bool)
    in_box[y0:y1, x0:x1] = True
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            np.testing.assert_array_equal(changed[b, t], in_box)  # the same box on every frame
    y = numpy_smooth(labels, 5, 0.1)
    np.testing.assert_allclose(np.asarray(targets), lam_true * y + (1 - lam_true) * y[::-1], rtol=1e-5)


def test_no_mixing_when_prob_zero():
    x, labels = _video(), np.array([1, 2, 3, 4])
    mixed, targets, lam, box = mixup.mix_batch(jax.random.key(0), jnp.asarray(x), jnp.asarray(labels), 5,
                                               prob=0.0, label_smoothing=0.2)
    assert float(lam) == 1.0
    np.testing.assert_array_equal(np.asarray(mixed), x)
    np.testing.assert_allclose(np.asarray(targets), numpy_smooth(labels, 5, 0.2), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(box), [0, 0, 0, 0])


def test_switch_prob_picks_cutmix_about_half_the_time():
    x, labels = jnp.asarray(_video(b=2, t=1, h=16, w=16, c=1)), jnp.array([0, 1])
    mix = jax.jit(jax.vmap(lambda k: mixup.mix_batch(k, x, labels, 2)[3]))
    boxes = np.asarray(mix(jax.random.split(jax.random.key(1), 400)))
    cutmix = np.mean(np.any(boxes != 0, axis=1))  # (a cutmix draw can also give an empty box, rarely)
    assert 0.4 < cutmix < 0.6


def test_soft_target_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 7)).astype(np.float32) * 3
    targets = rng.dirichlet(np.ones(7), size=6).astype(np.float32)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    expected = np.mean(np.sum(-targets * logp, axis=1))
    got = float(mixup.soft_target_cross_entropy(jnp.asarray(logits), jnp.asarray(targets)))
    assert got == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# position-embedding interpolation and init_from


def _sep_tables(grid, e=3, seed=0):
    t, h, w = grid
    rng = np.random.default_rng(seed)
    return {"pos_embed_spatial": rng.normal(size=(1, h * w, e)).astype(np.float32),
            "pos_embed_temporal": rng.normal(size=(1, t, e)).astype(np.float32),
            "pos_embed_class": rng.normal(size=(1, 1, e)).astype(np.float32)}


def test_interpolate_pos_embed_identity_and_shapes():
    tables = _sep_tables((2, 4, 4))
    same = warm_start.interpolate_pos_embed(tables, (2, 4, 4), (2, 4, 4))
    for k in tables:
        np.testing.assert_array_equal(same[k], tables[k])
    out = warm_start.interpolate_pos_embed(tables, (2, 4, 4), (4, 6, 6))
    assert out["pos_embed_spatial"].shape == (1, 36, 3)
    assert out["pos_embed_temporal"].shape == (1, 4, 3)
    np.testing.assert_array_equal(out["pos_embed_class"], tables["pos_embed_class"])
    joint = {"pos_embed": np.random.default_rng(1).normal(size=(1, 1 + 2 * 4 * 4, 3)).astype(np.float32)}
    out = warm_start.interpolate_pos_embed(joint, (2, 4, 4), (3, 2, 2))
    assert out["pos_embed"].shape == (1, 1 + 3 * 2 * 2, 3)
    np.testing.assert_array_equal(out["pos_embed"][:, 0], joint["pos_embed"][:, 0])  # the class position


def test_interpolate_pos_embed_values():
    # temporal: linear with half-pixel centres; output i samples input position (i + 0.5) * 4 / 8 - 0.5
    ramp = {"pos_embed_temporal": np.arange(4, dtype=np.float32).reshape(1, 4, 1)}
    out = warm_start.interpolate_pos_embed(ramp, (4, 1, 1), (8, 1, 1))["pos_embed_temporal"][0, :, 0]
    np.testing.assert_allclose(out, np.interp(np.arange(8) / 2 - 0.25, np.arange(4), np.arange(4)), atol=1e-6)
    # spatial: a constant table stays constant; a table linear in the row index stays linear inside
    const = {"pos_embed_spatial": np.full((1, 16, 2), 0.7, np.float32)}
    out = warm_start.interpolate_pos_embed(const, (1, 4, 4), (1, 7, 7))["pos_embed_spatial"]
    np.testing.assert_allclose(out, 0.7, rtol=1e-5)


def _save_tiny_mae(path, c):
    model = MaskedAutoencoder(rngs=nnx.Rngs(3), **c.model.to_dict())
    params = jax.device_get(nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))
    checkpoint.save_params(str(path), params, c.model.to_dict())
    return params


def test_load_encoder_params_drops_decoder_and_resizes(tiny_config, tmp_path):
    saved = _save_tiny_mae(tmp_path / "mae", tiny_config)
    c = finetune_config(tiny_config)
    c.model.img_size = 48  # a 6 x 6 token grid instead of 4 x 4
    abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: finetune.build_model(c, nnx.Rngs(0))), nnx.Param)[1])
    enc = warm_start.load_encoder_params(str(tmp_path / "mae"), abstract, c.model)
    assert set(enc) == set(abstract) - {"head"}
    assert not any(k.startswith("decoder_") or k == "mask_token" for k in enc)
    assert enc["pos_embed_spatial"].shape == (1, 36, c.model.embed_dim)
    np.testing.assert_array_equal(enc["pos_embed_temporal"], saved["pos_embed_temporal"])
    for a, b in zip(jax.tree.leaves(enc["blocks"]), jax.tree.leaves(saved["blocks"])):
        np.testing.assert_array_equal(a, b)


def test_init_from_mismatched_model_names_the_parameter(tiny_config, tmp_path):
    _save_tiny_mae(tmp_path / "mae", tiny_config)  # t_patch_size 2
    c = finetune_config(tiny_config)
    c.init_from = str(tmp_path / "mae")
    c.model.t_patch_size = 4  # the reference's common mistake
    with pytest.raises(ValueError, match=r"patch_embed/proj/kernel: checkpoint \(2, 8, 8, 3, 32\)"):
        finetune.train(c, str(tmp_path / "ft"))
    assert not (tmp_path / "ft" / "metrics.jsonl").exists()


def test_init_from_with_another_head_count_is_refused(tiny_config, tmp_path):
    """num_heads changes no parameter shape: the saved model.json is what tells a 2-head encoder from
    a 4-head one, and both the warm start and the evaluation's classifier load check it."""
    _save_tiny_mae(tmp_path / "mae", tiny_config)  # 2 heads
    c = finetune_config(tiny_config)
    c.model.num_heads = 4
    abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: finetune.build_model(c, nnx.Rngs(0))), nnx.Param)[1])
    with pytest.raises(ValueError, match=r"has num_heads=2 \(its model.json\), config.model.num_heads=4: set "
                                         r"--config.model.num_heads=2"):
        warm_start.load_encoder_params(str(tmp_path / "mae"), abstract, c.model)
    c.model.num_heads = 2
    assert "blocks" in warm_start.load_encoder_params(str(tmp_path / "mae"), abstract, c.model)
    model = finetune.build_model(c, nnx.Rngs(0))
    checkpoint.save_params(str(tmp_path / "clf"), jax.device_get(nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])),
                           dict(kind="classifier", **finetune.classifier_kwargs(c)))
    c.model.num_heads = 4
    from mae_st_jax import evaluate
    with pytest.raises(ValueError, match="config.model.num_heads=4: set --config.model.num_heads=2"):
        evaluate.load_classifier_params(c, str(tmp_path / "clf"), abstract, None)


# ----------------------------------------------------------------------------------------------
# validation and the loop


def test_evaluate_counts_every_video_once_and_matches_numpy(tiny_config):
    c = finetune_config(tiny_config)
    mesh = shd.make_mesh(c.mesh)
    model = finetune.build_model(c, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    source = validation.make_eval_source(c)
    assert len(source) == 12
    assert source.info(0).name == f"synthetic_{c.data.num_videos:06d}"  # after the training videos
    eval_step = finetune_step.make_eval_step(graphdef, mesh, c, jax.tree.map(lambda _: shd.replicated(mesh), params))
    got = finetune.evaluate(eval_step, params, source, c, finetune_step.eval_batch_shardings(mesh))
    clips = [validation.eval_clip(source, i, c) for i in range(12)]
    video = np.stack([v for v, _ in clips]).astype(np.float32) / 255.0
    video = (video - np.asarray(c.data.mean)) / np.asarray(c.data.std)
    labels = np.array([l for _, l in clips])
    logits = np.asarray(model(jnp.asarray(video, jnp.float32), deterministic=True), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(
        1, keepdims=True)
    order = np.argsort(-logits, axis=1)
    assert got["eval_top1"] == pytest.approx(np.mean(order[:, 0] == labels), abs=1e-6)
    assert got["eval_top5"] == pytest.approx(np.mean((order[:, :5] == labels[:, None]).any(1)), abs=1e-6)
    assert got["eval_loss"] == pytest.approx(-np.mean(logp[np.arange(12), labels]), rel=1e-4)
    assert got["eval_skipped"] == 0

    # an unreadable validation video is left out and counted (it used to end the run after training)
    from mae_st_jax.data.errors import BadVideo

    class Unreadable:
        def __init__(self, source, bad):
            self.source, self.bad = source, bad

        def __len__(self):
            return len(self.source)

        def info(self, i):
            if i in self.bad:
                raise BadVideo(f"video {i}: Invalid data found when processing input")
            return self.source.info(i)

        def frames(self, i, idx):
            return self.source.frames(i, idx)

    flaky = Unreadable(source, {1, 7})
    batch = next(validation.eval_batches(flaky, c, 8))
    np.testing.assert_array_equal(batch["valid"], [i not in (1, 7) for i in range(8)])
    assert not batch["video"][1].any()
    got = finetune.evaluate(eval_step, params, flaky, c, finetune_step.eval_batch_shardings(mesh))
    keep = np.array([i not in (1, 7) for i in range(12)])
    assert got["eval_skipped"] == 2
    assert got["eval_top1"] == pytest.approx(np.mean((order[:, 0] == labels)[keep]), abs=1e-6)
    assert got["eval_loss"] == pytest.approx(-np.mean(logp[np.arange(12), labels][keep]), rel=1e-4)


def _finetune_losses(c, devices, num_steps=2):
    mesh = shd.make_mesh(c.mesh, devices=devices)
    model_fn = lambda r: finetune.build_model(c, r)
    params = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))), nnx.Param)[1])
    tx, schedule = optim.make_optimizer(c, 8, 2, lr_scales=optim.layer_decay_scales(params, c.model.depth, 0.75))
    graphdef, state, state_sh = step_lib.create_state(model_fn, tx, mesh, c)
    train_step = finetune_step.make_train_step(graphdef, tx, schedule, mesh, c, state_sh)
    loader = pipeline.ClipLoader(pipeline.make_source(c), c)
    batch_sh = {"video": shd.batch_sharding(mesh, 6), "label": shd.batch_sharding(mesh, 2)}
    losses = []
    for s in range(num_steps):
        state, m = train_step(state, pipeline.to_global(loader.batch(s), batch_sh))
        losses.append(float(m["loss"]))
    return np.array(losses)


def test_sharded_finetune_step_matches_one_device(tiny_config):
    c = finetune_config(tiny_config, drop_path_rate=0.0, dropout_rate=0.0)  # mixup partners cross devices
    c.batch_size = 16
    one = _finetune_losses(c, jax.devices()[:1])
    c.mesh.update(data=8, fsdp=1)  # 2 clips per device: each sample's partner lives on another device
    np.testing.assert_allclose(_finetune_losses(c, jax.devices()), one, rtol=1e-5)


def test_finetune_from_pretraining_writes_eval_metrics_and_resumes(tiny_config, tmp_path):
    pretrain.train(tiny_config, str(tmp_path / "pre"))  # 4 steps
    c = finetune_config(tiny_config, layer_decay=0.75)
    c.init_from = str(tmp_path / "pre")
    c.total_steps = 4
    c.eval_every_steps = 2
    finetune.train(c, str(tmp_path / "straight"))
    straight = read_metrics(str(tmp_path / "straight"))
    evals = {m["step"]: m for m in straight if "eval_top1" in m}
    assert sorted(evals) == [2, 4]
    for m in evals.values():
        assert 0.0 <= m["eval_top1"] <= m["eval_top5"] <= 1.0
        assert m["eval_top1"] * 12 == pytest.approx(round(m["eval_top1"] * 12), abs=1e-4)  # 12 videos, no pads
        assert np.isfinite(m["eval_loss"]) and m["eval_loss"] > 0
    train_losses = {m["step"]: m["loss"] for m in straight if "loss" in m}
    assert sorted(train_losses) == [1, 2, 3, 4]

    c.total_steps = 3  # stops at 3 (checkpoints 2 and 3), then resumes to 4
    finetune.train(c, str(tmp_path / "resumed"))
    c.total_steps = 4
    c.init_from = str(tmp_path / "does_not_exist")  # a resumed run restores its own params
    finetune.train(c, str(tmp_path / "resumed"))
    resumed = read_metrics(str(tmp_path / "resumed"))
    assert [m["step"] for m in resumed if "loss" in m] == [1, 2, 3, 4]
    assert {m["step"]: m["loss"] for m in resumed if "loss" in m} == train_losses  # bit-identical
    resumed_evals = {m["step"]: m for m in resumed if "eval_top1" in m}
    assert sorted(resumed_evals) == [2, 3, 4]  # the stopped run validated after its last step, 3
    assert resumed_evals[2] == evals[2] and resumed_evals[4] == evals[4]
    assert checkpoint.load_params(str(tmp_path / "resumed"))[1]["kind"] == "classifier"


def test_finetune_config_validation_names_the_field(tiny_config):
    c = finetune_config(tiny_config)
    config_lib.validate(c, 8)
    c.data.flip = True
    with pytest.raises(config_lib.ConfigError, match="config.data.flip"):
        config_lib.validate(c, 8)
    c.data.flip = False
    c.finetune.layer_decay = 0.0
    with pytest.raises(config_lib.ConfigError, match="config.finetune.layer_decay"):
        config_lib.validate(c, 8)
    c.finetune.layer_decay = 0.75
    c.eval_batch_size = 12
    with pytest.raises(config_lib.ConfigError, match="config.eval_batch_size"):
        config_lib.validate(c, 8)


@pytest.mark.parametrize("arg,width,depth,decay,drop_path,dropout,epochs,lr,classes,repeat_aug", [
    ("vit_b,k400", 768, 12, 0.65, 0.1, 0.3, 75, 6e-4, 400, 2),
    ("vit_l,k400", 1024, 24, 0.75, 0.2, 0.3, 50, 2.4e-3 * 512 / 256, 400, 2),
    ("vit_h,ssv2", 1280, 32, 0.8, 0.2, 0.5, 75, 3e-4, 174, 1),  # PySlowFast's H config samples each video once
])
def test_finetune_config_recipes(arg, width, depth, decay, drop_path, dropout, epochs, lr, classes, repeat_aug):
    c = load_config_module("finetune").get_config(arg)
    config_lib.validate(c, 8)
    assert (c.mode, c.model.embed_dim, c.model.depth, c.data.num_classes) == ("finetune", width, depth, classes)
    f, o = c.finetune, c.optim
    assert (f.layer_decay, f.drop_path_rate, f.dropout_rate, c.num_epochs) == (decay, drop_path, dropout, epochs)
    assert optim.peak_learning_rate(c) == pytest.approx(lr, rel=1e-9)
    assert (f.mixup_alpha, f.cutmix_alpha, f.mixup_prob, f.switch_prob, f.label_smoothing) == (0.8, 1.0, 1.0, 0.5, 0.1)
    assert (o.b1, o.b2, o.weight_decay, o.min_lr, o.clip_grad, o.decay_tokens) == (0.9, 0.999, 0.05, 1e-6, 5.0, False)
    assert (c.batch_size, c.data.repeat_aug, c.warmup_epochs) == (512, repeat_aug, 5.0)
    demo = load_config_module("finetune").get_config("demo")
    config_lib.validate(demo, 8)
    assert demo.init_from == "" and demo.model.embed_dim == load_config_module("demo").get_config().model.embed_dim


def test_demo_finetune_script_runs_three_stages_prints_their_top1_and_resumes(tmp_path):
    """launch/demo_finetune.sh with tiny step counts: the pre-training is norm-pix (configs/demo.py:long),
    only the first fine-tuning starts from it, the table printed is the runs' own eval_top1, and a second
    call finds every stage finished and prints the same table."""
    work = tmp_path / "w"
    env = dict(os.environ, VENV=sys.prefix, PRETRAIN_FLAGS="--config.total_steps=3 --config.schedule_steps=3",
               FINETUNE_FLAGS="--config.total_steps=4 --config.eval_every_steps=2")
    cmd = ["bash", str(ROOT / "launch" / "demo_finetune.sh"), str(work), "--config.data.num_eval_videos=24",
           "--config.model.depth=1", "--config.warmup_steps=1", "--config.seed=3"]

    def run():
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    first = run()
    configs = {stage: json.loads((work / stage / "config.json").read_text()) for stage in
               ("pretrain", "finetune", "scratch")}
    assert configs["pretrain"]["model"]["norm_pix_loss"] is True and configs["pretrain"]["total_steps"] == 3
    assert configs["finetune"]["init_from"] == str(work / "pretrain") and configs["scratch"]["init_from"] == ""
    assert all(c["seed"] == 3 and c["model"]["depth"] == 1 for c in configs.values())
    evals = {stage: {r["step"]: r["eval_top1"] for r in read_metrics(str(work / stage))
                     if "eval_top1" in r} for stage in ("finetune", "scratch")}
    assert sorted(evals["finetune"]) == sorted(evals["scratch"]) == [2, 4]
    table = first.stdout.splitlines()
    assert table[0].split() == ["step", "pre-trained", "scratch"]
    for line, step in zip(table[1:3], (2, 4)):
        got = [float(x.rstrip("%")) / 100 for x in line.split()[1:]]
        assert line.split()[0] == str(step)
        assert got == pytest.approx([evals["finetune"][step], evals["scratch"][step]], abs=5e-5)
    assert table[3].startswith("validation top-1 at step 4: pre-trained ")
    second = run()
    assert second.stderr.count("Nothing to do: checkpoint step") == 3
    assert second.stdout == first.stdout
