"""Tests for the config files (configs/*.py) and config_lib.validate's errors."""

import copy
import importlib.util
import pathlib

import pytest

from mae_st_jax import config_lib
from mae_st_jax.config_lib import ConfigError

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
PRETRAIN_ARGS = ["vit_b", "vit_l,k400", "vit_h", "vit_s"]


def load(name):
    """Import configs/<name>.py from its path, as the --config flag does."""
    spec = importlib.util.spec_from_file_location(f"test_config_{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo():
    return load("demo").get_config()


def set_dotted(config, dotted, value):
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        assert part in node, f"{dotted}: no field {part!r}"
        node = node[part]
    assert leaf in node, f"{dotted}: no field {leaf!r}"
    node[leaf] = value


# ----------------------------------------------------------------------------------------------
# the config files


@pytest.mark.parametrize("num_devices", [1, 8])
def test_demo_config_validates(num_devices):
    c = demo()
    config_lib.validate(c, num_devices=num_devices)
    assert c.mode == "pretrain"
    assert c.batch_size % 8 == 0
    assert config_lib.total_steps(c) == 300
    assert config_lib.warmup_steps(c) == 30


def test_demo_long_differs_from_the_demo_in_targets_and_length_only():
    base, long = demo().to_dict(), load("demo").get_config("long")
    config_lib.validate(long, num_devices=1)
    assert config_lib.total_steps(long) == 3000 and long.schedule_steps == 3000
    assert base["model"]["norm_pix_loss"] is False and long.model.norm_pix_loss is True
    changed = {k for k in base if base[k] != long.to_dict()[k]}
    assert changed == {"model", "total_steps", "schedule_steps", "log_every_steps", "checkpoint_every_steps"}
    assert {k for k, v in base["model"].items() if long.model[k] != v} == {"norm_pix_loss"}
    with pytest.raises(ValueError, match="configs/demo.py:longer"):
        load("demo").get_config("longer")


@pytest.mark.parametrize("arg", PRETRAIN_ARGS)
def test_pretrain_config_validates(arg):
    c = load("pretrain").get_config(arg)
    assert c.batch_size % 8 == 0
    config_lib.validate(c, num_devices=8)
    config_lib.validate(c, num_devices=1)
    # the recipe (REFERENCE.md, pre-training)
    m, o = c.model, c.optim
    assert (m.num_frames, m.img_size, m.t_patch_size, m.pred_t_dim) == (16, 224, 2, 8)
    assert m.mask_ratio == 0.9 and m.mask_strategy == "random" and m.norm_pix_loss
    assert m.sep_pos_embed and m.cls_embed
    assert (m.decoder_embed_dim, m.decoder_depth) == (512, 4)
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.blr, o.min_lr, o.clip_grad) == (
        0.9, 0.95, 1e-8, 0.05, 1.6e-3, 0.0, 0.02)
    assert c.data.repeat_aug == 4 and c.data.sampling_rate == 4
    assert not o.lr_counts_repeat_aug
    assert o.decay_tokens


@pytest.mark.parametrize("arg,width,depth,heads,patch", [
    ("vit_s", 384, 12, 6, 16), ("vit_b", 768, 12, 12, 16), ("vit_l,k400", 1024, 24, 16, 16),
    ("vit_h", 1280, 32, 16, 16)])
def test_pretrain_model_sizes(arg, width, depth, heads, patch):
    m = load("pretrain").get_config(arg).model
    assert (m.embed_dim, m.depth, m.num_heads, m.patch_size) == (width, depth, heads, patch)


def test_pretrain_default_is_vit_l_k400():
    mod = load("pretrain")
    a, b = mod.get_config(), mod.get_config("vit_l,k400")
    assert a.to_dict() == b.to_dict()
    assert b.data.num_videos == 240_436  # Kinetics-400 training list (REFERENCE-scale dataset)


def test_unknown_model_size_raises():
    mod = load("pretrain")
    with pytest.raises(ValueError) as e:
        mod.get_config("vit_x")
    msg = str(e.value)
    for choice in ("vit_b", "vit_l", "vit_h"):
        assert choice in msg, msg


@pytest.mark.parametrize("arg", ["k400", "vit_b,vit_l", "vit_b,k400,k700", ""])
def test_bad_pretrain_args_raise(arg):
    mod = load("pretrain")
    if arg == "":  # empty: the default (vit_l, k400)
        assert mod.get_config(arg).model.embed_dim == 1024
        return
    with pytest.raises(ValueError) as e:
        mod.get_config(arg)
    assert "vit_b" in str(e.value) and "k400" in str(e.value), str(e.value)


def test_pretrain_vit_h14():
    c = load("pretrain").get_config("vit_h14")
    assert (c.model.embed_dim, c.model.patch_size) == (1280, 14)
    config_lib.validate(c, num_devices=8)
    grid = (c.model.num_frames // c.model.t_patch_size, c.model.img_size // c.model.patch_size)
    assert grid == (8, 16)  # 8 * 16 * 16 = 2048 tokens


@pytest.mark.parametrize("name", ["demo", "pretrain"])
def test_sweep_points_are_valid(name):
    mod = load(name)
    base = mod.get_config("vit_b") if name == "pretrain" else mod.get_config()
    points = mod.sweep()
    assert isinstance(points, list) and points
    seen = set()
    for point in points:
        assert isinstance(point, dict) and point
        c = copy.deepcopy(base)
        for key, value in point.items():
            set_dotted(c, key, value)
        config_lib.validate(c, num_devices=8)
        for key, value in point.items():  # applied to the copy only
            node = c
            for part in key.split("."):
                node = node[part]
            assert node == value
        seen.add(tuple(sorted(point.items())))
    assert len(seen) == len(points), "duplicate sweep points"
    # the base config was not touched
    assert base.to_dict() == (mod.get_config("vit_b") if name == "pretrain" else mod.get_config()).to_dict()


# ----------------------------------------------------------------------------------------------
# validate: each error names its field


def expect_error(c, *fields, num_devices=8):
    with pytest.raises(ConfigError) as e:
        config_lib.validate(c, num_devices=num_devices)
    for field in fields:
        assert field in str(e.value), (field, str(e.value))
    return str(e.value)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_batch_not_divisible_by_devices():
    c = demo()
    c.batch_size = 36  # divisible by repeat_aug 2, not by 8 devices
    expect_error(c, "batch_size", "8 devices")
    config_lib.validate(c, num_devices=4)  # fine on 4


def test_micro_batch_not_divisible_by_devices():
    c = demo()
    c.grad_accum_steps = 8  # 32 / 8 = 4 clips per micro-batch, 8 devices
    expect_error(c, "batch_size", "grad_accum_steps")


def test_batch_not_divisible_by_grad_accum():
    c = demo()
    c.grad_accum_steps = 3
    expect_error(c, "batch_size", "grad_accum_steps")


def test_batch_not_divisible_by_repeat_aug():
    c = demo()
    c.data.repeat_aug = 3
    expect_error(c, "batch_size", "repeat_aug")


def test_img_size_not_divisible_by_patch():
    c = demo()
    c.model.img_size = 50
    expect_error(c, "img_size", "patch_size")


def test_num_frames_not_divisible_by_t_patch():
    c = demo()
    c.model.num_frames = 9
    expect_error(c, "num_frames", "t_patch_size")


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.1])
def test_bad_mask_ratio(ratio):
    c = demo()
    c.model.mask_ratio = ratio
    expect_error(c, "mask_ratio")


def test_mask_ratio_that_keeps_nothing():
    c = demo()  # grid 4 x 6 x 6: frame masking at 0.9 keeps int(0.4) = 0 frames
    c.model.update(mask_strategy="frame", mask_ratio=0.9)
    expect_error(c, "mask_ratio")


def test_unknown_mask_strategy():
    c = demo()
    c.model.mask_strategy = "checkerboard"
    expect_error(c, "mask_strategy", "checkerboard")


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
def test_unknown_dtype(field):
    c = demo()
    c.model[field] = "float8"
    expect_error(c, field, "float8")


def test_unknown_remat():
    c = demo()
    c.model.remat = "everything"
    expect_error(c, "remat", "everything")


def test_embed_dim_not_divisible_by_heads():
    c = demo()
    c.model.embed_dim = 130  # 4 heads
    expect_error(c, "embed_dim", "num_heads")


def test_decoder_dim_not_divisible_by_heads():
    c = demo()
    c.model.decoder_embed_dim = 66  # 4 heads
    expect_error(c, "decoder_embed_dim", "decoder_num_heads")


@pytest.mark.parametrize("mesh", [dict(data=-1, fsdp=3), dict(data=2, fsdp=2), dict(data=16, fsdp=1),
                                  dict(data=-1, fsdp=-1)])
def test_mesh_that_does_not_fit(mesh):
    c = demo()
    c.mesh.update(mesh)
    expect_error(c, "mesh")


@pytest.mark.parametrize("mesh", [dict(data=-1, fsdp=2), dict(data=4, fsdp=2), dict(data=-1, fsdp=8)])
def test_mesh_that_fits(mesh):
    c = demo()
    c.mesh.update(mesh)
    config_lib.validate(c, num_devices=8)


def test_unknown_mode():
    c = demo()
    c.mode = "distill"
    expect_error(c, "mode", "distill")


@pytest.mark.parametrize("warmup", [300, 301])
def test_warmup_not_shorter_than_total(warmup):
    c = demo()
    c.schedule_steps = 0  # the schedule spans the training: total_steps = 300
    assert config_lib.schedule_steps(c) == 300
    c.warmup_steps = warmup
    expect_error(c, "warmup")
    c.warmup_steps = 299
    config_lib.validate(c, num_devices=8)


def test_warmup_not_shorter_than_schedule():
    c = demo()
    c.schedule_steps = 600  # a schedule longer than this run: warmup is measured against it
    c.warmup_steps = 450
    config_lib.validate(c, num_devices=8)
    c.warmup_steps = 600
    expect_error(c, "warmup")


def test_warmup_epochs_not_shorter_than_total():
    c = demo()
    c.total_steps = 0
    c.schedule_steps = 0
    c.num_epochs = 2
    c.warmup_steps = -1
    c.warmup_epochs = 2.0
    expect_error(c, "warmup")


@pytest.mark.parametrize("pred_t_dim", [3, 2, 5])
def test_bad_pred_t_dim(pred_t_dim):
    c = demo()  # num_frames 8, t_patch 2: pred_t_dim 3 / 5 do not divide 8; 2 gives u = 1/2
    c.model.pred_t_dim = pred_t_dim
    expect_error(c, "pred_t_dim")


def test_unknown_target_frames():
    c = demo()
    c.model.target_frames = "middle"
    expect_error(c, "target_frames", "middle")


@pytest.mark.parametrize("field,value", [("decoder_cls", "mean"), ("decoder_pos_table", "sincos")])
def test_unknown_decoder_layout(field, value):
    c = demo()
    c.model[field] = value
    expect_error(c, field, value)


@pytest.mark.parametrize("pred_t_dim", [4, 8])
def test_good_pred_t_dim(pred_t_dim):
    c = demo()
    c.model.pred_t_dim = pred_t_dim
    config_lib.validate(c, num_devices=8)


def test_derived_steps():
    c = demo()  # 2048 videos, 32 clips / repeat_aug 2 = 16 videos per step -> 128 steps per epoch
    assert config_lib.steps_per_epoch(c) == 128
    c.total_steps = 0
    c.schedule_steps = 0
    c.num_epochs = 3
    c.warmup_steps = -1
    c.warmup_epochs = 0.5
    assert config_lib.total_steps(c) == 384
    assert config_lib.schedule_steps(c) == 384
    assert config_lib.warmup_steps(c) == 64
    config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize("field,value,words", [
    ("data.synthetic_classes", 99, ("synthetic_classes", "num_classes must be in [2, 32]")),
    ("data.synthetic_label", "bogus", ("synthetic_label", "label_by")),
    ("data.synthetic_background", "bogus", ("synthetic_background", "background")),
    ("model.attention_impl", "cudnn", ("attention_impl='cudnn' needs an NVIDIA GPU",)),
    ("model.mask_block_size", (0, 0, 0), ("mask_block_size=(0, 0, 0)",)),
    ("optim.eps", 0.0, ("config.optim.eps=0.0 must be > 0",)),
    ("optim.lr", -1e-3, ("config.optim.lr=-0.001 must be >= 0",)),
    ("total_steps", -5, ("config.total_steps=-5 must be >= 0",)),
    ("skip_nonfinite_limit", -1, ("config.skip_nonfinite_limit=-1 must be >= 0",)),
])
def test_values_that_used_to_fail_after_compiling_are_config_errors(field, value, words):
    c = demo()
    if field == "model.mask_block_size":
        c.model.mask_strategy = "block"
    section, name = field.split(".") if "." in field else (None, field)
    (c[section] if section else c)[name] = value
    expect_error(c, *words)


@pytest.mark.parametrize("field,value,words", [
    ("temporal_views", 0, "config.test.temporal_views=0 must be >= 1"),
    ("spatial_views", 2, "config.test.spatial_views=2 must be 1 or 3"),
    ("batch_videos", -1, "config.test.batch_videos=-1 must be >= 0"),
])
def test_multiview_test_fields_name_the_one_that_failed(field, value, words):
    c = load("finetune").get_config("demo")
    c.mode = "evaluate"
    c.test[field] = value
    assert expect_error(c, words, num_devices=1) == words
