"""Tests for the PyTorch checkpoint converter and the fine-tuning classifier, against a torch MAE-ST."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util

sys.path.insert(0, os.path.dirname(__file__))
import torch_reference as ref  # noqa: E402

from mae_st_jax.convert import from_torch as conv  # noqa: E402
from mae_st_jax.models import MaskedAutoencoder, VideoClassifier  # noqa: E402
from mae_st_jax.train import checkpoint  # noqa: E402

torch.set_num_threads(2)
MASK_RATIO = 0.75


def numpy_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def jit_apply(model, *args, **kwargs):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a, **kwargs))(state, *args)


def assert_close(ours, theirs):
    """Elementwise rtol 1e-5 with atol 3e-6 * max|theirs|, and RMS error under 3e-6 of RMS.

    Torch fp32 and our fp32 each sit ~1e-6 * max from a float64 run of the same torch model:
    this is rounding noise, so a tighter elementwise bound would test summation order.
    """
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=3e-6 * np.abs(theirs).max())
    assert np.sqrt(np.mean((ours - theirs) ** 2) / np.mean(theirs ** 2)) < 3e-6


def assert_pretrain_forward_matches(model, torch_model, seed: int):
    """Our MaskedAutoencoder and the torch one on the same random clips [2, C, T, H, W] and noise: the same
    mask, predictions within assert_close, the loss within 1e-5 relative."""
    g = model.geometry
    rng = np.random.default_rng(seed)
    video = rng.standard_normal((2, 3, g.num_frames, g.img_size, g.img_size)).astype(np.float32)
    noise = rng.random((2, g.num_patches)).astype(np.float32)
    with torch.no_grad():
        loss_t, pred_t, mask_t = torch_model(torch.from_numpy(video), torch.from_numpy(noise), MASK_RATIO)
    loss, pred, mask = jit_apply(model, jnp.asarray(video.transpose(0, 2, 3, 4, 1)), jnp.asarray(noise),
                                 mask_ratio=MASK_RATIO)
    np.testing.assert_array_equal(np.asarray(mask), mask_t.numpy())
    assert_close(pred, pred_t.numpy())
    np.testing.assert_allclose(float(loss), float(loss_t), rtol=1e-5)


def assert_trees_equal(a: dict, b: dict):
    a, b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=str(key))


def assert_state_dicts_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# B/16-shaped (width 768, 12 heads; decoder 512 x 16 heads) but 2 + 2 blocks and tiny clips.
PRETRAIN_CASES = {
    "sep_cls_8x32_pred4": dict(sep_pos_embed=True, cls_embed=True, num_frames=8, img_size=32, pred_t_dim=4),
    "joint_nocls_8x32_pred8": dict(sep_pos_embed=False, cls_embed=False, num_frames=8, img_size=32, pred_t_dim=8),
    "sep_nocls_4x64_pred4": dict(sep_pos_embed=True, cls_embed=False, num_frames=4, img_size=64, pred_t_dim=4),
    "joint_cls_4x64_pred2": dict(sep_pos_embed=False, cls_embed=True, num_frames=4, img_size=64, pred_t_dim=2),
}


@pytest.fixture(scope="module")
def pretrain_sd():
    return numpy_state(ref.randomize(ref.MaskedAutoencoder(**PRETRAIN_CASES["sep_cls_8x32_pred4"]), 7))


@pytest.mark.parametrize("name", list(PRETRAIN_CASES))
def test_pretrain_matches_torch(name):
    case = PRETRAIN_CASES[name]
    torch_model = ref.randomize(ref.MaskedAutoencoder(**case), seed=len(name)).eval()
    sd = numpy_state(torch_model)
    impl = "reference" if case["cls_embed"] else ""
    config = conv.infer_model_config(sd, num_frames=case["num_frames"], attention_impl=impl)
    assert config["kind"] == "pretrain" and config["pred_t_dim"] == case["pred_t_dim"]
    assert (config["img_size"], config["embed_dim"], config["num_heads"], config["decoder_num_heads"]) == (
        case["img_size"], 768, 12, 16)
    params = conv.torch_to_params(sd, config)
    model = conv.model_from_params(params, config)

    assert_pretrain_forward_matches(model, torch_model, seed=0)

    assert_state_dicts_equal(conv.params_to_torch(params, config), sd)  # import -> export: the file
    assert_trees_equal(conv.torch_to_params(conv.params_to_torch(params, config), config), params)


@pytest.mark.parametrize("sep,cls", [(True, True), (False, False)])
def test_classifier_matches_torch(sep, cls):
    torch_model = ref.randomize(ref.VisionTransformer(num_classes=7, sep_pos_embed=sep, cls_embed=cls), 3).eval()
    sd = numpy_state(torch_model)
    config = conv.infer_model_config(sd, num_frames=8)
    assert config["kind"] == "classifier" and config["num_classes"] == 7
    params = conv.torch_to_params(sd, config)
    model = conv.model_from_params(params, config)
    video = np.random.default_rng(1).standard_normal((3, 3, 8, 32, 32)).astype(np.float32)
    with torch.no_grad():
        logits_t = torch_model(torch.from_numpy(video)).numpy()
    logits = jit_apply(model, jnp.asarray(video.transpose(0, 2, 3, 4, 1)))
    assert logits.dtype == jnp.float32
    assert_close(logits, logits_t)
    assert_state_dicts_equal(conv.params_to_torch(params, config), sd)


def test_export_then_import_is_identity():
    kwargs = dict(img_size=32, num_frames=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                  decoder_depth=2, decoder_num_heads=4, pred_t_dim=4)
    abstract = nnx.split(nnx.eval_shape(lambda: MaskedAutoencoder(rngs=nnx.Rngs(0), **kwargs)), nnx.Param)[1]
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), nnx.to_pure_dict(abstract))
    config = {"kind": "pretrain", **kwargs}
    sd = conv.params_to_torch(params, config)
    assert sd["patch_embed.proj.weight"].shape == (64, 3, 2, 16, 16)
    assert sd["blocks.1.attn.q.weight"].shape == (64, 64) and "blocks.2.attn.q.weight" not in sd
    assert_trees_equal(conv.torch_to_params(sd, config), params)
    inferred = conv.infer_model_config(sd, num_heads=4, decoder_num_heads=4)
    assert {k: inferred[k] for k in config} == config


def test_pyslowfast_layout_matches_mae_st(tmp_path, pretrain_sd):
    classifier_sd = numpy_state(ref.randomize(ref.VisionTransformer(num_classes=5), 4))
    for sd in (pretrain_sd, classifier_sd):
        path = tmp_path / "ckpt.pyth"
        fused = ref.to_pyslowfast({k: torch.from_numpy(v) for k, v in sd.items()})
        fused["model_state"] = {"module." + k: v for k, v in fused["model_state"].items()}
        torch.save(fused, path)
        loaded = conv.load_torch_state_dict(str(path))
        assert any(".attn.qkv." in k for k in loaded) and not any(k.startswith("module.") for k in loaded)
        config = conv.infer_model_config(sd)
        assert conv.infer_model_config(loaded) == config
        assert_trees_equal(conv.torch_to_params(loaded, config), conv.torch_to_params(sd, config))


def test_pyslowfast_mae_checkpoint_matches_torch(tmp_path):
    """A PySlowFast MaskMViT pre-training .pyth (decoder under pred_head, the encoder's class token decoded,
    a joint decoder pos table, 64-wide decoder heads, every other frame as the target): imported, it gives
    the torch model's loss, predictions and mask; exported, the same file back."""
    torch_model = ref.randomize(ref.MaskedAutoencoder(pyslowfast=True, num_frames=8, img_size=32, pred_t_dim=4,
                                                      num_heads=6, decoder_embed_dim=128, decoder_num_heads=2), 5)
    torch_model.eval()
    sd = {k: torch.from_numpy(v) for k, v in numpy_state(torch_model).items()}
    assert "decoder_cls_token" not in sd and sd["decoder_pos_embed"].shape == (1, 1 + 4 * 2 * 2, 128)
    cfg = ("MVIT:\n  EMBED_DIM: 768\n  NUM_HEADS: 6\nMASK:\n  MAE_ON: true\n  NORM_PRED_PIXEL: true\n"
           "AUG:\n  MASK_RATIO: 0.75\nDATA:\n  NUM_FRAMES: 8\n")  # as PySlowFast's cfg.dump() writes it
    saved = ref.to_pyslowfast_mae(sd, decoder_depth=2, cfg=cfg)
    assert {"pred_head.transforms.0.2.weight", "pred_head.projections.0.weight",
            "pred_head.transforms.0.1.attn.qkv.weight"} <= set(saved["model_state"])
    saved["model_state"] = {"module." + k: v for k, v in saved["model_state"].items()}
    torch.save(saved, tmp_path / "mae.pyth")
    loaded, hints = conv.load_torch_file(str(tmp_path / "mae.pyth"))
    assert hints == {"num_heads": 6, "norm_pix_loss": True, "mask_ratio": 0.75, "num_frames": 8}  # from its cfg
    config = conv.infer_model_config(loaded, hints, attention_impl="reference")
    assert {k: config[k] for k in ("kind", "decoder_cls", "decoder_pos_table", "decoder_num_heads", "target_frames",
                                   "pred_t_dim", "num_frames", "decoder_depth", "num_heads")} == dict(
        kind="pretrain", decoder_cls="encoder", decoder_pos_table="joint", decoder_num_heads=2,
        target_frames="stride", pred_t_dim=4, num_frames=8, decoder_depth=2, num_heads=6)
    model = conv.model_from_params(conv.torch_to_params(loaded, config), config)
    assert_pretrain_forward_matches(model, torch_model, seed=2)
    assert conv.settings_from_cfg("MVIT: [unclosed", 768) == {} and conv.settings_from_cfg(cfg, 1024) == {
        "norm_pix_loss": True, "mask_ratio": 0.75, "num_frames": 8}  # another width: its head count is not ours
    with pytest.raises(ValueError, match="decoder_cls=encoder, config says token"):
        conv.torch_to_params(loaded, {**config, "decoder_cls": "token"})
    with pytest.raises(ValueError, match="decoder_pos_table=joint, config says same"):
        conv.torch_to_params(loaded, {**config, "decoder_pos_table": "same"})

    conv.convert(str(tmp_path / "mae.pyth"), str(tmp_path / "ours"))
    conv.convert(str(tmp_path / "ours"), str(tmp_path / "back.pyth"), export=True)
    back = torch.load(tmp_path / "back.pyth", weights_only=True)["model_state"]
    assert_state_dicts_equal({k: v.numpy() for k, v in back.items()},
                             {k.removeprefix("module."): v.numpy() for k, v in saved["model_state"].items()})
    assert conv.load_torch_file(str(tmp_path / "back.pyth"))[1] == hints  # its cfg says what the shapes cannot

    # a head on a second encoder depth (MASK.PRETRAIN_DEPTH [k, 23]): the encoder imports, a pre-training model cannot
    extra = dict(loaded, **{"pred_head.transforms.1.0.norm1.weight": np.ones(128, np.float32),
                            "pred_head.projections.1.weight": np.ones((768, 128), np.float32)})
    encoder_config = conv.infer_model_config(extra, hints, kind="encoder")
    assert_trees_equal(conv.torch_to_params(extra, encoder_config), conv.torch_to_params(loaded, encoder_config))
    with pytest.raises(ValueError, match="several encoder depths"):
        conv.torch_to_params(extra, config)


def test_init_from_settings_are_compared_as_the_model_sees_them():
    """check_saved_settings: 'same' is the encoder's layout, decoder_cls means nothing without a class token, and
    a model of another width is left to the shape check (which names it) instead of a head-count message."""
    from mae_st_jax.train import step as step_lib

    names = step_lib.UNSHAPED_MAE_SETTINGS
    saved = dict(embed_dim=64, num_heads=4, sep_pos_embed=True, cls_embed=True, decoder_num_heads=1,
                 decoder_cls="token", decoder_pos_table="separate", target_frames="linspace")
    step_lib.check_saved_settings(saved, {**saved, "decoder_pos_table": "same"}, "d", names)
    step_lib.check_saved_settings({**saved, "cls_embed": False}, {**saved, "cls_embed": False,
                                                                  "decoder_cls": "encoder"}, "d", names)
    step_lib.check_saved_settings(saved, {**saved, "embed_dim": 128, "num_heads": 8}, "d", names)
    step_lib.check_saved_settings({"num_heads": 4}, saved, "d", names)  # an older model.json: only what it has
    with pytest.raises(ValueError, match="has decoder_pos_table=separate .* set --config.model.decoder_pos_table="
                                         "separate"):
        step_lib.check_saved_settings(saved, {**saved, "decoder_pos_table": "joint"}, "d", names)
    with pytest.raises(ValueError, match="has target_frames=linspace"):
        step_lib.check_saved_settings(saved, {**saved, "target_frames": "stride"}, "d", names)


def _error(sd, config, **changes):
    with pytest.raises(ValueError) as err:
        conv.torch_to_params(sd, {**config, **changes})
    return str(err.value)


def test_errors_name_the_setting_or_key(pretrain_sd):
    config = conv.infer_model_config(pretrain_sd)
    msg = _error(pretrain_sd, config, t_patch_size=4)
    assert "t_patch_size=2, config says 4" in msg and "--config.model.t_patch_size=2" in msg
    assert "--config.model.decoder_depth=2" in _error(pretrain_sd, config, decoder_depth=4)
    assert "pred_t_dim=4" in _error(pretrain_sd, config, pred_t_dim=8)
    assert "img_size=32, config says 48" in _error(pretrain_sd, config, img_size=48)

    h14 = numpy_state(ref.MaskedAutoencoder(patch_size=14, img_size=28, num_frames=4, embed_dim=64, num_heads=4,
                                            decoder_embed_dim=32, decoder_num_heads=4, pred_t_dim=2))
    msg = _error(h14, conv.infer_model_config(h14), patch_size=16, img_size=32)
    assert "patch_size=14, config says 16: set --config.model.patch_size=14" in msg

    missing = {k: v for k, v in pretrain_sd.items() if k != "blocks.1.mlp.fc2.bias"}
    assert "missing keys [blocks.1.mlp.fc2.bias]" in _error(missing, config)
    extra = {**pretrain_sd, "blocks.0.attn.rel_pos_h": np.zeros((3, 4), np.float32)}
    assert "unexpected keys [blocks.0.attn.rel_pos_h]" in _error(extra, config)
    bad = {**pretrain_sd, "mask_token": np.zeros((1, 2, 512), np.float32)}
    assert "mask_token (1, 2, 512)" in _error(bad, config)


def test_cli_round_trip(tmp_path):
    torch_model = ref.randomize(ref.MaskedAutoencoder(embed_dim=192, num_heads=3, decoder_embed_dim=128,
                                                      decoder_num_heads=16), 5)
    sd = numpy_state(torch_model)
    pth = tmp_path / "mae.pth"
    torch.save({"model": torch_model.state_dict(), "epoch": 9, "optimizer": {"state": {}}}, pth)
    out = tmp_path / "ours"
    conv.main(["from_torch", f"--input={pth}", f"--output={out}", "--config.model.attention_impl=xla"])
    params, model_config = checkpoint.load_params(str(out))
    expected_config = conv.infer_model_config(sd, attention_impl="xla")
    assert model_config == expected_config and model_config["num_heads"] == 3
    assert_trees_equal(params, conv.torch_to_params(sd, expected_config))

    back = tmp_path / "back.pth"
    conv.main(["from_torch", f"--input={out}", f"--output={back}", "--export"])
    exported = torch.load(back, weights_only=True)["model"]
    assert_state_dicts_equal({k: v.numpy() for k, v in exported.items()}, sd)



def test_mae_st_args_fill_what_the_shapes_cannot_show(tmp_path):
    """mae_st saves `args` (argparse.Namespace) beside the weights and builds its model from them: the
    head counts, norm_pix_loss and a joint table's frame count come from there, overrides still win."""
    import argparse

    torch_model = ref.randomize(ref.MaskedAutoencoder(embed_dim=64, num_heads=4, decoder_embed_dim=32,
                                                      decoder_num_heads=8, num_frames=4, img_size=64,
                                                      sep_pos_embed=False, cls_embed=False, pred_t_dim=2), 2)
    args = argparse.Namespace(model="mae_vit_base_patch16", decoder_num_heads=8, norm_pix_loss=False, num_frames=4,
                              input_size=224, batch_size=2, t_patch_size=2)
    pth = tmp_path / "mae.pth"
    torch.save({"model": torch_model.state_dict(), "args": args, "epoch": 3}, pth)
    sd, hints = conv.load_torch_file(str(pth))
    assert hints == {"decoder_num_heads": 8, "norm_pix_loss": False, "num_frames": 4}  # width 64 is not B's 768
    assert conv.settings_from_args(args, 768)["num_heads"] == 12 and conv.settings_from_args(None) == {}
    without = conv.infer_model_config(sd)  # what the shapes alone say: 16 frames, a 32 x 32 clip
    assert (without["num_frames"], without["img_size"], without["decoder_num_heads"]) == (16, 32, 16)
    config = conv.convert(str(pth), str(tmp_path / "ours"), overrides={"num_heads": 4})
    assert (config["num_frames"], config["img_size"], config["pred_t_dim"]) == (4, 64, 2)
    assert (config["num_heads"], config["decoder_num_heads"], config["norm_pix_loss"]) == (4, 8, False)
    clf = conv.infer_model_config(sd, hints, kind="classifier", num_classes=5)  # no decoder settings
    assert "decoder_num_heads" not in clf and "norm_pix_loss" not in clf and clf["num_heads"] == 1  # 64 // 64
    assert clf["num_frames"] == 4
    # the model it builds computes what the torch model does
    model = conv.load_into_model(str(pth), num_heads=4, attention_impl="xla")
    video = np.random.default_rng(0).normal(size=(2, 3, 4, 64, 64)).astype(np.float32)
    noise = np.random.default_rng(1).uniform(size=(2, 32)).astype(np.float32)
    with torch.no_grad():
        _, want, mask_t = torch_model.eval()(torch.from_numpy(video), torch.from_numpy(noise), MASK_RATIO)
    _, pred, mask = jit_apply(model, jnp.asarray(video.transpose(0, 2, 3, 4, 1)), jnp.asarray(noise),
                              mask_ratio=MASK_RATIO)
    np.testing.assert_array_equal(np.asarray(mask), mask_t.numpy())
    assert_close(pred, want.numpy())


def test_cli_errors_are_one_line(tmp_path, pretrain_sd, capsys):
    no_pred = {k: torch.from_numpy(v) for k, v in pretrain_sd.items() if not k.startswith("decoder_pred.")}
    torch.save({"model": no_pred}, tmp_path / "nopred.pth")
    with pytest.raises(SystemExit) as err:
        conv.main(["from_torch", f"--input={tmp_path / 'nopred.pth'}", f"--output={tmp_path / 'o'}"])
    msg = str(err.value)
    assert msg.startswith("error: ") and "\n" not in msg
    assert "missing keys [decoder_pred.bias, decoder_pred.weight]" in msg
    torch.save({"model": {k: torch.from_numpy(v) for k, v in pretrain_sd.items()}}, tmp_path / "mae.pth")
    with pytest.raises(SystemExit) as err:
        conv.main(["from_torch", f"--input={tmp_path / 'mae.pth'}", f"--output={tmp_path / 'o'}",
                   "--config.num_head=4"])
    assert str(err.value).startswith("error: --config.model.num_head: not a setting of a pretrain model")
    with pytest.raises(SystemExit) as err:
        conv.main(["from_torch", f"--input={tmp_path / 'mae.pth'}", f"--output={tmp_path / 'o'}",
                   "--config.num_heads=7"])
    assert str(err.value) == "error: num_heads=7 does not divide embed_dim=768: set --config.model.num_heads"
    with pytest.raises(SystemExit) as err:
        conv.main(["from_torch", f"--input={tmp_path / 'absent.pth'}", f"--output={tmp_path / 'o'}"])
    assert str(err.value).startswith("error: ") and "absent.pth" in str(err.value)
    (tmp_path / "noise.pth").write_bytes(np.random.default_rng(0).bytes(3000))
    for extra in ([], ["--allow_pickle"]):
        with pytest.raises(SystemExit) as err:
            conv.main(["from_torch", f"--input={tmp_path / 'noise.pth'}", f"--output={tmp_path / 'o'}", *extra])
        assert str(err.value).startswith("error: ") and "\n" not in str(err.value)
        assert ("pass --allow_pickle" in str(err.value)) == (not extra)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("old,new", [(14, 16), (16, 22), (14, 7), (4, 7), (3, 2)])
def test_pos_embed_resize_is_torch_interpolate(old, new):
    """Spatial bicubic and temporal linear resizes of the position tables are torch's
    interpolate(align_corners=False), as mae_st's interpolate_pos_embed calls it."""
    from mae_st_jax.train import warm_start

    rng = np.random.default_rng(old * 100 + new)
    e = 5
    joint = rng.normal(size=(1, 1 + 2 * old * old, e)).astype(np.float32)
    out = warm_start.interpolate_pos_embed({"pos_embed": joint}, (2, old, old), (2, new, new))["pos_embed"]
    grid = torch.from_numpy(joint[0, 1:].reshape(2, old, old, e)).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, 2 * new * new, e).numpy()
    np.testing.assert_array_equal(out[:, :1], joint[:, :1])
    # a few float32 units in the last place (torch's kernels fuse some multiply-adds); Keys' a = -0.5 or
    # jax.image.resize's edge handling were off by 2-10% of the table's largest value
    np.testing.assert_allclose(out[:, 1:], want, rtol=0, atol=1e-6 * np.abs(want).max())
    temporal = rng.normal(size=(1, old, e)).astype(np.float32)
    out = warm_start.interpolate_pos_embed({"pos_embed_temporal": temporal}, (old, 1, 1), (new, 1, 1))
    want = torch.nn.functional.interpolate(torch.from_numpy(temporal).permute(0, 2, 1), size=new, mode="linear",
                                           align_corners=False).permute(0, 2, 1).numpy()
    np.testing.assert_allclose(out["pos_embed_temporal"], want, rtol=0, atol=1e-6)

def test_stacked_parameter_directory_still_loads(tmp_path):
    # Parameters saved before the blocks were split per layer hold each block stack as one tree of
    # [depth, ...] arrays: load_params splits them, so warm starts and --export still read them.
    torch_model = ref.randomize(ref.MaskedAutoencoder(embed_dim=64, depth=3, num_heads=2, decoder_embed_dim=32,
                                                      decoder_depth=2, decoder_num_heads=4), 6)
    sd = numpy_state(torch_model)
    config = conv.infer_model_config(sd, attention_impl="xla")
    params = conv.torch_to_params(sd, config)
    assert sorted(params["blocks"]) == [0, 1, 2] and sorted(params["decoder_blocks"]) == [0, 1]
    old = dict(params)
    for name in ("blocks", "decoder_blocks"):
        layers = [params[name][i] for i in sorted(params[name])]
        old[name] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    assert old["blocks"]["attn"]["q"]["kernel"].shape == (3, 64, 64)
    checkpoint.save_params(str(tmp_path / "old"), old, config)
    loaded, loaded_config = checkpoint.load_params(str(tmp_path / "old"))
    assert loaded_config == config
    assert_trees_equal(loaded, params)  # same keys (ints 0, 1, ...), same values
    conv.main(["from_torch", f"--input={tmp_path / 'old'}", f"--output={tmp_path / 'back.pth'}", "--export"])
    exported = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert_state_dicts_equal({k: v.numpy() for k, v in exported.items()}, sd)


def test_pretrain_file_loads_as_classifier(tmp_path, pretrain_sd):
    path = tmp_path / "mae.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in pretrain_sd.items()}}, path)
    model = conv.load_into_model(str(path), kind="classifier", num_classes=5, drop_path_rate=0.1)
    assert isinstance(model, VideoClassifier) and model.head.kernel.shape == (768, 5)
    assert not hasattr(model, "decoder_embed")
    np.testing.assert_array_equal(np.asarray(model.blocks[1].mlp.fc1.kernel[...]),
                                  pretrain_sd["blocks.1.mlp.fc1.weight"].T)
    assert 0 < float(jnp.std(model.head.kernel[...])) < 1e-4  # fresh head, std 2e-5
    mae = conv.load_into_model(str(path))
    assert isinstance(mae, MaskedAutoencoder) and mae.pred_t_dim == 4


def test_classifier_drop_path_and_dropout():
    abstract = nnx.eval_shape(lambda: VideoClassifier(5, drop_path_rate=0.3, dropout_rate=0.5, img_size=32,
                                                      num_frames=4, embed_dim=32, depth=4, num_heads=2,
                                                      rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract, nnx.Param)
    rng = np.random.default_rng(0)  # random weights without compiling an initialiser
    model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype), state))
    np.testing.assert_allclose(model.drop_path_rates, np.linspace(0, 0.3, 4))
    video = jax.random.normal(jax.random.key(0), (4, 4, 32, 32, 3))
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda key, det: nnx.merge(graphdef, state)(video, key=key, deterministic=det), static_argnums=1)
    base = run(jax.random.key(1), True)  # a key alone changes nothing
    np.testing.assert_allclose(model(video), base, rtol=1e-5, atol=1e-6)  # eager, key=None
    a, b = run(jax.random.key(1), False), run(jax.random.key(2), False)
    np.testing.assert_array_equal(a, run(jax.random.key(1), False))
    assert not np.allclose(a, base) and not np.allclose(a, b)
    scales = np.asarray(model.drop_scales(jax.random.key(3), 20000))
    assert np.all(scales[0] == 1.0)  # block 0 has rate 0
    np.testing.assert_allclose(scales.mean(axis=(1, 2)), 1.0, atol=0.03)  # unbiased: keep-mask / keep
    np.testing.assert_allclose((scales == 0).mean(axis=(1, 2)), np.linspace(0, 0.3, 4), atol=0.01)
    with pytest.raises(ValueError, match="key"):
        model(video, deterministic=False)
    features = jax.jit(lambda v: nnx.merge(graphdef, state).features(v))(video)
    assert features.shape == (4, 32)
    np.testing.assert_allclose(model.head(features), base, rtol=1e-5, atol=1e-6)  # logits = head(features)


def test_finetune_starts_from_a_converted_pytorch_checkpoint(tmp_path, tiny_config):
    """The README's path: a mae_st .pth -> from_torch -> config.init_from of a fine-tuning run."""
    from mae_st_jax.train import finetune
    from mae_st_jax.train.logging import read_metrics

    m = tiny_config.model
    torch_model = ref.randomize(ref.MaskedAutoencoder(
        img_size=m.img_size, patch_size=m.patch_size, num_frames=m.num_frames, t_patch_size=m.t_patch_size,
        embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, decoder_embed_dim=32, decoder_depth=1,
        decoder_num_heads=16, pred_t_dim=m.pred_t_dim), 3)
    pth = tmp_path / "mae.pth"
    torch.save({"model": torch_model.state_dict()}, pth)
    conv.main(["from_torch", f"--input={pth}", f"--output={tmp_path / 'converted'}",
               f"--config.num_heads={m.num_heads}"])
    tiny_config.mode = "finetune"
    tiny_config.data.update(flip=False, num_eval_videos=8)
    tiny_config.optim.update(b2=0.999, decay_tokens=False, lr_counts_repeat_aug=True, clip_grad=5.0, lr=1e-4)
    tiny_config.init_from = str(tmp_path / "converted")
    tiny_config.total_steps = 1
    outcome = finetune.run(tiny_config, str(tmp_path / "ft"))
    # one step with lr 1e-4 moves the encoder only a little away from the torch weights
    q = np.asarray(outcome.state["params"]["blocks"][0]["attn"]["q"]["kernel"])
    torch_q = torch_model.state_dict()["blocks.0.attn.q.weight"].numpy().T
    assert np.abs(q - torch_q).max() < 2e-3 and np.abs(torch_q).max() > 1e-2
    assert "eval_top1" in read_metrics(str(tmp_path / "ft"))[-1]


def test_pretraining_continues_from_a_converted_pyslowfast_checkpoint(tmp_path, tiny_config):
    """A PySlowFast MaskMViT .pyth -> from_torch -> config.init_from of pre-training: a config with mae_st's decoder
    stops naming the setting to change; with PySlowFast's decoder it trains on from the torch weights."""
    from mae_st_jax.train import loop, pretrain
    from mae_st_jax.train.logging import read_metrics

    m = tiny_config.model
    torch_model = ref.randomize(ref.MaskedAutoencoder(
        pyslowfast=True, img_size=m.img_size, patch_size=m.patch_size, num_frames=m.num_frames,
        t_patch_size=m.t_patch_size, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
        decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=1, pred_t_dim=m.pred_t_dim), 3)
    torch.save(ref.to_pyslowfast_mae(torch_model.state_dict(), 1, cfg=f"MVIT:\n  EMBED_DIM: {m.embed_dim}\n  "
                                     f"NUM_HEADS: {m.num_heads}\n"), tmp_path / "mae.pyth")
    conv.main(["from_torch", f"--input={tmp_path / 'mae.pyth'}", f"--output={tmp_path / 'converted'}",
               f"--config.mask_ratio={m.mask_ratio}"])
    tiny_config.model.update(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=1)
    tiny_config.init_from = str(tmp_path / "converted")
    tiny_config.total_steps = 1
    with pytest.raises(loop.InitFromError, match=r"has decoder_cls=encoder .* set --config.model.decoder_cls=encoder"):
        pretrain.run(tiny_config, str(tmp_path / "mae_st_decoder"))
    tiny_config.model.update(decoder_cls="encoder", decoder_pos_table="joint")
    with pytest.raises(loop.InitFromError, match=r"set --config.model.target_frames=stride"):  # [0, 2], not [0, 3]
        pretrain.run(tiny_config, str(tmp_path / "mae_st_targets"))
    tiny_config.model.target_frames = "stride"
    outcome = pretrain.run(tiny_config, str(tmp_path / "pt"))
    assert outcome.metrics and np.isfinite(read_metrics(str(tmp_path / "pt"))[-1]["loss"])
    q = np.asarray(outcome.state["params"]["decoder_blocks"][0]["attn"]["q"]["kernel"])
    torch_q = torch_model.state_dict()["decoder_blocks.0.attn.q.weight"].numpy().T
    assert np.abs(q - torch_q).max() < 0.05 * np.abs(torch_q).max()  # one AdamW step away from the torch weights
