"""Shared config pieces: the default ConfigDict, model sizes, derived quantities and validation."""

import math

import jax
import ml_collections

from mae_st_jax import masking
from mae_st_jax.models import layers, mae
from mae_st_jax.models.mae import model_kwargs, target_frame_indices, token_grid

MODES = ("pretrain", "finetune", "evaluate")
SOURCES = ("synthetic", "tfrecord", "videos", "tfds")
DTYPES = ("float32", "bfloat16", "float16")


def parse_flags(argv):
    """absl's flag parsing for app.run(main, flags_parser=parse_flags): a --config.* override naming no
    config field (ml_collections raises AttributeError/KeyError, three chained tracebacks) exits with
    one line, its 'Did you mean' kept; other flag errors as absl reports them."""
    import sys

    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError) as e:
        import re

        text = str(e.args[0]) if e.args else str(e)
        field, hint = re.search(r"(\w+)", text), re.search(r"Did you mean [^?]*\?", text)
        overrides = [a.split("=", 1)[0].split(".") for a in argv[1:] if a.startswith("--config.")]
        if field is None or not any(field[1] in names for names in overrides):
            raise  # not from an override: the config file's own error, with its traceback
        sys.exit(f"flag error: a --config override names no config field: {field[1] if field else text}"
                 + (f" ({hint[0]})" if hint else ""))


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the paper's ViT-L/16 pre-training recipe on synthetic data."""
    c = ml_collections.ConfigDict()
    c.mode = "pretrain"
    c.seed = 0
    c.init_from = ""  # a parameter checkpoint or a workdir to start the params from

    c.model = ml_collections.ConfigDict(dict(
        model_kwargs("l16"),
        img_size=224, num_frames=16, t_patch_size=2, in_chans=3, mlp_ratio=4.0, qkv_bias=True,
        sep_pos_embed=True, cls_embed=True,
        decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16,
        pred_t_dim=8, target_frames="linspace", norm_pix_loss=True,
        decoder_cls="token", decoder_pos_table="same",  # mae_st's decoder; PySlowFast's: "encoder", "joint"
        mask_ratio=0.9, mask_strategy="random", mask_block_size=(2, 2, 2),
        dtype="float32", param_dtype="float32", remat="none", scan_layers=False, attention_impl="",
    ))

    c.data = ml_collections.ConfigDict(dict(
        source="synthetic", path="",
        num_videos=4096, num_classes=8, video_frames=96, video_fps=30.0,  # synthetic source
        synthetic_radius=(0.075, 0.15), synthetic_speed=(0.015, 0.04),  # main shape size, px/frame: x side
        synthetic_classes=0,  # (shape, direction) classes the videos come from (0: num_classes)
        synthetic_label="class",  # the label: "class", "shape" (4 kinds), "direction" (8), "orientation" (4)
        synthetic_background="gradient",  # or "plain" (one colour per video)
        # validation: synthetic -> num_eval_videos held-out videos (indices after num_videos; 0: none);
        # real sources -> the videos at eval_path (tfrecord glob / list file / tfds name with eval_split),
        # the first num_eval_videos of them during fine-tuning when > 0
        num_eval_videos=256, eval_path="",
        eval_split="validation",
        sampling_rate=4, target_fps=30.0, repeat_aug=4, flip=True,
        mean=(0.45, 0.45, 0.45), std=(0.225, 0.225, 0.225),
        num_workers=4, prefetch=2,
        # real sources (data/sources.py): tfrecord path = glob of shards, videos path = list file,
        # tfds path = dataset name or directory (split, data_dir, video_key, label_key below)
        split="train", data_dir="", video_key="video", label_key="label",
        crop="auto",  # auto: random_resized for real sources, none (flip only) for synthetic
        crop_area=(0.5, 1.0), crop_aspect=(0.75, 1.3333),  # RandomResizedCrop area fraction, aspect (w/h)
        # the `videos` source decodes frames resized to this short side, as the reference's decoder does
        # (its video_min_dimension, 256 for 224 crops); -1: img_size * 256 / 224; 0: the file's own size
        decode_short_side=-1,
    ))

    c.batch_size = 512  # global clips per optimizer step (repeat_aug clips per video included)
    c.grad_accum_steps = 1
    c.num_epochs = 400  # over videos; effective epochs = num_epochs * repeat_aug
    c.total_steps = 0  # > 0 overrides num_epochs: where training stops
    c.schedule_steps = 0  # > 0: length of the lr schedule, independent of where this run stops
    c.warmup_epochs = 5.0
    c.warmup_steps = -1  # >= 0 overrides warmup_epochs

    c.optim = ml_collections.ConfigDict(dict(
        blr=1.6e-3, lr=0.0, min_lr=0.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
        clip_grad=0.02, decay_tokens=True, lr_counts_repeat_aug=False,
    ))

    # fine-tuning (mode "finetune"; REFERENCE.md's ViT-L recipe; unused in pre-training)
    c.finetune = ml_collections.ConfigDict(dict(
        drop_path_rate=0.1, dropout_rate=0.3, head_init_std=2e-5, layer_decay=0.75,
        mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, switch_prob=0.5, label_smoothing=0.1,
        interpolate_pos_embed=True,  # resize init_from's pos-embeds when the token grid differs
        rand_augment="rand-m7-mstd0.5-inc1",  # timm-style spec, one draw per clip ('' = off)
        reprob=0.25,  # random erasing (one box per clip, all frames, N(0, 1) pixels after normalising)
        linear_probe=False,  # True: frozen encoder (no drop path, no erasing), only the final norm and head train
    ))
    # mode "evaluate": the multi-view test of config.init_from (or of the fine-tuning run in workdir)
    c.test = ml_collections.ConfigDict(dict(
        temporal_views=7,  # K uniformly spaced clips per video (paper: 7; mae_st code: 10)
        spatial_views=3,  # 3: left/centre/right crops of the short-side-resized clip; 1: centre only
        batch_videos=0,  # videos per global batch (0: eval_batch_size // views, at least one per device)
        split="eval",  # "eval": the validation set (data.eval_path / held-out synthetic); "train"
    ))
    c.eval_every_steps = 0  # fine-tuning: validate every N steps (0: only after the last step)
    c.eval_batch_size = 0  # 0: the training micro-batch size

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    c.param_sharding = "replicate"  # or "fsdp"
    c.sharding_rules = ()  # extra (regex, "replicate" | "fsdp") rules, tried first
    c.fsdp_min_size = 2 ** 12  # arrays with fewer elements stay replicated under fsdp

    c.skip_nonfinite = False  # True: skip (and count) updates with a NaN/Inf loss or gradient
    c.skip_nonfinite_limit = 200  # ... but stop when this many updates in a row were skipped (0: never)
    c.data.max_skip_fraction = 0.1  # stop when more clips than this came from unreadable videos (beyond chance)
    c.data.read_timeout_s = 900  # stop when no batch comes for this long (a read that hangs); 0: wait for ever
    c.debug = ml_collections.ConfigDict(dict(inject_nan_at_step=-1, inject_nan_count=1))  # fault injection for tests

    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.profile_start_step = -1  # >= 0: trace profile_num_steps steps into workdir
    c.profile_num_steps = 5
    c.write_reconstruction = True
    return c


def steps_per_epoch(config) -> int:
    videos_per_step = config.batch_size // config.data.repeat_aug
    return max(1, config.data.num_videos // videos_per_step)


def total_steps(config) -> int:
    if config.total_steps > 0:
        return int(config.total_steps)
    return int(config.num_epochs * steps_per_epoch(config))


def schedule_steps(config) -> int:
    """Steps the warmup + cosine schedule spans (defaults to the training length)."""
    if config.schedule_steps > 0:
        return int(config.schedule_steps)
    return total_steps(config)


def warmup_steps(config) -> int:
    if config.warmup_steps >= 0:
        return int(config.warmup_steps)
    return int(round(config.warmup_epochs * steps_per_epoch(config)))


def has_eval_data(config) -> bool:
    d = config.data
    return d.num_eval_videos > 0 if d.source == "synthetic" else bool(d.eval_path)


def eval_batch_size(config) -> int:
    return int(config.eval_batch_size) or config.batch_size // config.grad_accum_steps


def validate(config, num_devices: int, process_count: int = 1) -> None:
    """Raise ConfigError naming the first bad field; runs before anything compiles."""
    def fail(msg):
        raise ConfigError(msg)

    m, d, o = config.model, config.data, config.optim
    if config.mode not in MODES:
        fail(f"config.mode={config.mode!r}: choose one of {MODES}")
    for field in ("img_size", "patch_size", "num_frames", "t_patch_size", "embed_dim", "depth", "num_heads",
                  "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "pred_t_dim", "in_chans"):
        if int(m[field]) < 1:
            fail(f"config.model.{field}={m[field]} must be a positive integer")
    if m.img_size % m.patch_size:
        fail(f"config.model.img_size={m.img_size} is not divisible by config.model.patch_size={m.patch_size}")
    if m.num_frames % m.t_patch_size:
        fail(f"config.model.num_frames={m.num_frames} is not divisible by "
             f"config.model.t_patch_size={m.t_patch_size}")
    if m.embed_dim % m.num_heads:
        fail(f"config.model.embed_dim={m.embed_dim} is not divisible by config.model.num_heads={m.num_heads}")
    if m.decoder_embed_dim % m.decoder_num_heads:
        fail(f"config.model.decoder_embed_dim={m.decoder_embed_dim} is not divisible by "
             f"config.model.decoder_num_heads={m.decoder_num_heads}")
    for field, choices in (("decoder_cls", mae.DECODER_CLS), ("decoder_pos_table", mae.DECODER_POS_TABLES)):
        if m.get(field, choices[0]) not in choices:
            fail(f"config.model.{field}={m[field]!r}: choose one of {choices}")
    if not 0.0 < m.mask_ratio < 1.0:
        fail(f"config.model.mask_ratio={m.mask_ratio} must be in (0, 1)")
    if m.mask_strategy not in masking.STRATEGIES:
        fail(f"config.model.mask_strategy={m.mask_strategy!r}: choose one of {masking.STRATEGIES}")
    try:
        masking.num_visible(m.mask_strategy, token_grid(m), m.mask_ratio)
        target_frame_indices(m.num_frames, m.pred_t_dim, m.target_frames)
    except ValueError as e:
        fail(f"config.model: {e}")
    if m.num_frames % m.pred_t_dim or (m.t_patch_size * m.pred_t_dim) % m.num_frames:
        fail(f"config.model.pred_t_dim={m.pred_t_dim} must divide num_frames={m.num_frames} and "
             f"t_patch_size*pred_t_dim must be a multiple of num_frames")
    for field in ("dtype", "param_dtype"):
        if m[field] not in DTYPES:
            fail(f"config.model.{field}={m[field]!r}: choose one of {DTYPES}")
    if m.remat not in layers.REMAT_POLICIES:
        fail(f"config.model.remat={m.remat!r}: choose one of {sorted(layers.REMAT_POLICIES)}")
    if m.attention_impl not in ("", "xla", "cudnn", "reference"):
        fail(f"config.model.attention_impl={m.attention_impl!r}: choose '', 'xla', 'cudnn' or 'reference'")
    if m.attention_impl == "cudnn" and jax.default_backend() != "gpu":
        fail(f"config.model.attention_impl='cudnn' needs an NVIDIA GPU, and this is {jax.default_backend()}: "
             f"use '' (the right kernel for the backend)")
    if m.mask_strategy == "block" and min(m.mask_block_size) < 1:
        fail(f"config.model.mask_block_size={tuple(m.mask_block_size)}: each side must be >= 1")

    if d.source not in SOURCES:
        fail(f"config.data.source={d.source!r}: choose one of {SOURCES}")
    if d.source == "synthetic":
        from mae_st_jax.data import synthetic
        try:  # only checks its arguments: no frame is drawn
            synthetic.from_config(config, max(1, d.num_videos))
        except ValueError as e:
            fail(f"config.data (the synthetic videos: synthetic_classes or num_classes, synthetic_label, "
                 f"synthetic_background, video_frames, video_fps): {e}")
    tests_eval_set = config.mode == "evaluate" and config.test.split == "eval"  # reads eval_path only
    if d.source != "synthetic" and not d.path and not tests_eval_set:
        fail(f"config.data.source={d.source!r} needs config.data.path (tfrecord: a glob of shards, videos: a "
             f"list file, tfds: a dataset name or directory)")
    if d.get("decode_short_side", -1) < -1:
        fail(f"config.data.decode_short_side={d.decode_short_side} must be -1 (auto), 0 (off) or a size")
    if d.crop not in ("auto", "random_resized", "none"):
        fail(f"config.data.crop={d.crop!r}: choose 'auto', 'random_resized' or 'none'")
    if not (0 < d.crop_area[0] <= d.crop_area[1] <= 1 and 0 < d.crop_aspect[0] <= d.crop_aspect[1]):
        fail(f"config.data.crop_area={tuple(d.crop_area)} needs 0 < lo <= hi <= 1 and config.data.crop_aspect="
             f"{tuple(d.crop_aspect)} 0 < lo <= hi")
    if d.repeat_aug < 1:
        fail(f"config.data.repeat_aug={d.repeat_aug} must be >= 1")
    if d.sampling_rate < 1:
        fail(f"config.data.sampling_rate={d.sampling_rate} must be >= 1")
    if len(d.mean) != m.in_chans or len(d.std) != m.in_chans or min(d.std) <= 0:
        fail(f"config.data.mean/std need {m.in_chans} entries and positive std")
    if config.batch_size < 1:
        fail(f"config.batch_size={config.batch_size} must be positive")
    if config.batch_size % d.repeat_aug:
        fail(f"config.batch_size={config.batch_size} is not divisible by config.data.repeat_aug={d.repeat_aug}")
    if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
        fail(f"config.batch_size={config.batch_size} is not divisible by "
             f"config.grad_accum_steps={config.grad_accum_steps}")
    micro = config.batch_size // config.grad_accum_steps
    if micro % num_devices:
        fail(f"config.batch_size={config.batch_size} (micro-batch {micro} with grad_accum_steps="
             f"{config.grad_accum_steps}) is not divisible by the {num_devices} devices")
    if micro % process_count:
        fail(f"config.batch_size={config.batch_size}: micro-batch {micro} is not divisible by "
             f"{process_count} processes")
    mesh_shape = [config.mesh.get("data", -1), config.mesh.get("fsdp", 1)]
    known = math.prod(s for s in mesh_shape if s != -1)
    if mesh_shape.count(-1) > 1 or known < 1 or (num_devices % known if -1 in mesh_shape else known != num_devices):
        fail(f"config.mesh={dict(config.mesh)} does not fit {num_devices} devices: use data=-1 and an "
             f"fsdp size that divides {num_devices}")
    if config.param_sharding not in ("replicate", "fsdp"):
        fail(f"config.param_sharding={config.param_sharding!r}: choose 'replicate' or 'fsdp'")
    if config.data.source == "synthetic" and d.num_videos < config.batch_size // d.repeat_aug:
        fail(f"config.data.num_videos={d.num_videos} is smaller than the {config.batch_size // d.repeat_aug} "
             f"videos one step needs")
    if config.total_steps < 0:
        fail(f"config.total_steps={config.total_steps} must be >= 0 (0: config.num_epochs sets the length)")
    steps = total_steps(config)
    if steps < 1:
        fail(f"config.total_steps / config.num_epochs give {steps} steps: set config.total_steps > 0")
    if warmup_steps(config) >= schedule_steps(config):
        fail(f"config.warmup_steps/warmup_epochs give {warmup_steps(config)} warmup steps, not fewer than "
             f"the {schedule_steps(config)} steps of the schedule (config.total_steps / schedule_steps)")
    if o.blr <= 0 and o.lr <= 0:
        fail("config.optim.blr (or config.optim.lr) must be positive")
    if o.lr < 0:
        fail(f"config.optim.lr={o.lr} must be >= 0 (0: blr x batch / 256)")
    if not o.eps > 0:
        fail(f"config.optim.eps={o.eps} must be > 0 (AdamW divides by sqrt(v) + eps)")
    if o.min_lr < 0 or o.weight_decay < 0 or o.clip_grad < 0:
        fail("config.optim.min_lr, weight_decay and clip_grad must be >= 0")
    if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
        fail(f"config.optim.b1={o.b1} and b2={o.b2} must be in [0, 1)")
    if d.read_timeout_s < 0:
        fail(f"config.data.read_timeout_s={d.read_timeout_s} must be >= 0 (0: no limit)")
    if not 0.0 <= d.max_skip_fraction <= 1.0:
        fail(f"config.data.max_skip_fraction={d.max_skip_fraction} must be in [0, 1]")
    if config.skip_nonfinite_limit < 0:
        fail(f"config.skip_nonfinite_limit={config.skip_nonfinite_limit} must be >= 0 (0: no limit)")
    for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[field] < 1:
            fail(f"config.{field}={config[field]} must be >= 1")
    if config.mode in ("finetune", "evaluate"):
        validate_finetune(config, num_devices, process_count)


def validate_finetune(config, num_devices: int, process_count: int = 1) -> None:
    """The fine-tuning fields (mode 'finetune'); raise ConfigError naming the first bad one."""
    f, d = config.finetune, config.data
    if d.num_classes < 2:
        raise ConfigError(f"config.data.num_classes={d.num_classes} must be >= 2")
    for field in ("drop_path_rate", "dropout_rate", "label_smoothing"):
        if not 0.0 <= f[field] < 1.0:
            raise ConfigError(f"config.finetune.{field}={f[field]} must be in [0, 1)")
    for field in ("mixup_prob", "switch_prob"):
        if not 0.0 <= f[field] <= 1.0:
            raise ConfigError(f"config.finetune.{field}={f[field]} must be in [0, 1]")
    for field in ("mixup_alpha", "cutmix_alpha", "head_init_std"):
        if f[field] < 0:
            raise ConfigError(f"config.finetune.{field}={f[field]} must be >= 0")
    if not 0.0 < f.layer_decay <= 1.0:
        raise ConfigError(f"config.finetune.layer_decay={f.layer_decay} must be in (0, 1] (1: no layer decay)")
    if config.eval_every_steps < 0 or d.num_eval_videos < 0:
        raise ConfigError(f"config.eval_every_steps={config.eval_every_steps} and config.data.num_eval_videos="
                          f"{d.num_eval_videos} must be >= 0")
    batch = eval_batch_size(config)
    if batch < 1 or batch % num_devices or batch % process_count:
        raise ConfigError(f"config.eval_batch_size={config.eval_batch_size} (gives {batch}) must be a positive "
                          f"multiple of the {num_devices} devices and {process_count} processes")
    try:
        from mae_st_jax.data import randaug
        randaug.parse(f.rand_augment)
    except ValueError as e:
        raise ConfigError(f"config.finetune.rand_augment: {e}") from None
    if not 0.0 <= f.reprob <= 1.0:
        raise ConfigError(f"config.finetune.reprob={f.reprob} must be in [0, 1]")
    t = config.test
    if t.temporal_views < 1:
        raise ConfigError(f"config.test.temporal_views={t.temporal_views} must be >= 1")
    if t.spatial_views not in (1, 3):
        raise ConfigError(f"config.test.spatial_views={t.spatial_views} must be 1 or 3")
    if t.batch_videos < 0:
        raise ConfigError(f"config.test.batch_videos={t.batch_videos} must be >= 0")
    if t.split not in ("eval", "train"):
        raise ConfigError(f"config.test.split={t.split!r}: choose 'eval' or 'train'")
    if config.mode == "evaluate" and t.split == "eval" and not has_eval_data(config):
        raise ConfigError(f"config.mode='evaluate' needs validation videos: set config.data.eval_path (source "
                          f"{d.source!r})" if d.source != "synthetic" else
                          "config.mode='evaluate' on synthetic data needs config.data.num_eval_videos > 0")
    if d.source == "synthetic" and d.flip:
        raise ConfigError("config.data.flip=True mirrors left/right motion, which is the synthetic videos' class: "
                          "set config.data.flip=False to fine-tune on them")
