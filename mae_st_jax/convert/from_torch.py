"""PyTorch MAE-ST checkpoints (mae_st `.pth`, PySlowFast `.pyth`) <-> our NNX parameter trees.

Import:  python -m mae_st_jax.convert.from_torch --input=FILE.pth --output=DIR [--config.num_heads=16 ...]
Export:  python -m mae_st_jax.convert.from_torch --input=DIR --output=FILE.pth --export

Overrides may be written `--config.x=y` or `--config.model.x=y`; `--config.kind=classifier
--config.num_classes=400` turns a pre-training checkpoint into a classifier to fine-tune.
"""

import argparse
import ast
import functools
import inspect
import json
import math
import pickle
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx, traverse_util

from mae_st_jax.models.classifier import VideoClassifier
from mae_st_jax.models.mae import MaskedAutoencoder, VideoEncoder, decoder_table_separate
from mae_st_jax.train import checkpoint

KINDS = {"pretrain": MaskedAutoencoder, "classifier": VideoClassifier, "encoder": VideoEncoder}
DEFAULT_HEADS = {384: 6, 768: 12, 1024: 16, 1280: 16}
DECODER_KEY = re.compile(r"^(decoder_|mask_token)")


# --- reading a torch file -----------------------------------------------------------------------
def _numpy(value) -> np.ndarray:
    """A torch tensor (fp16/bf16 widened to fp32) or array-like as a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point() and value.element_size() < 4:
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def load_torch_state_dict(path: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The model weights of a `.pth`/`.pyth` file (or a bare state dict) as numpy arrays, keys
    without a DDP `module.` prefix. Loads with weights_only=True unless `allow_pickle`."""
    return load_torch_file(path, allow_pickle=allow_pickle)[0]


# mae_st builds its model as models_mae.__dict__[args.model](**vars(args)), and saves `args` beside the
# weights: these of its fields are model settings that the weights' shapes do not show.
ARGS_SETTINGS = ("decoder_num_heads", "norm_pix_loss", "num_frames")
MODEL_NAME_HEADS = {"mae_vit_base_patch16": (768, 12), "mae_vit_large_patch16": (1024, 16),
                    "mae_vit_huge_patch14": (1280, 16), "vit_base_patch16": (768, 12),
                    "vit_large_patch16": (1024, 16), "vit_huge_patch14": (1280, 16)}  # name: (width, heads)


def settings_from_args(args, embed_dim: int | None = None) -> dict:
    """The model settings a mae_st checkpoint's `args` (argparse.Namespace or dict) records and the
    weights' shapes do not: num_heads (from args.model's name, when its width is `embed_dim`),
    decoder_num_heads, norm_pix_loss, num_frames. Empty for anything else."""
    if args is None:
        return {}
    fields = vars(args) if hasattr(args, "__dict__") and not isinstance(args, dict) else args
    if not isinstance(fields, dict):
        return {}
    out = {k: fields[k] for k in ARGS_SETTINGS if isinstance(fields.get(k), (bool, int))}
    width, heads = MODEL_NAME_HEADS.get(fields.get("model"), (None, None))
    if heads is not None and width == embed_dim:
        out["num_heads"] = heads
    return out


def settings_from_cfg(cfg_text, embed_dim: int | None = None) -> dict:
    """The model settings a PySlowFast checkpoint's `cfg` (its config as YAML, cfg.dump()) records and the
    weights' shapes do not: num_heads (MVIT.NUM_HEADS, when MVIT.EMBED_DIM is `embed_dim`), norm_pix_loss
    (MASK.NORM_PRED_PIXEL), mask_ratio (AUG.MASK_RATIO), num_frames (DATA.NUM_FRAMES) and mask_strategy
    'tube' (AUG.MASK_TUBE). Empty for anything else, or a cfg that does not parse."""
    if not isinstance(cfg_text, str):
        return {}
    import yaml  # noqa: PLC0415 (PyYAML comes with ml_collections)
    try:
        cfg = yaml.safe_load(cfg_text)
    except yaml.YAMLError as e:
        logging.warning("the checkpoint's cfg is not YAML PySlowFast wrote (%s): not read", str(e).splitlines()[0])
        return {}
    if not isinstance(cfg, dict):
        return {}
    section = lambda name: cfg.get(name) if isinstance(cfg.get(name), dict) else {}
    mvit, mask, aug, data = section("MVIT"), section("MASK"), section("AUG"), section("DATA")
    out = {}
    if isinstance(mvit.get("NUM_HEADS"), int) and mvit.get("EMBED_DIM") == embed_dim:
        out["num_heads"] = mvit["NUM_HEADS"]
    if mask.get("MAE_ON") and isinstance(mask.get("NORM_PRED_PIXEL"), bool):
        out["norm_pix_loss"] = mask["NORM_PRED_PIXEL"]
    if mask.get("MAE_ON") and isinstance(aug.get("MASK_RATIO"), float) and 0 < aug["MASK_RATIO"] < 1:
        out["mask_ratio"] = aug["MASK_RATIO"]
    if isinstance(data.get("NUM_FRAMES"), int):
        out["num_frames"] = data["NUM_FRAMES"]
    if mask.get("MAE_ON") and aug.get("MASK_TUBE") is True:
        out["mask_strategy"] = "tube"
    if mask.get("MAE_ON") and mask.get("PER_FRAME_MASKING") is True:
        logging.warning("the checkpoint was trained with MASK.PER_FRAME_MASKING (the same ratio masked in every "
                        "frame): no mask_strategy here does that; it imports with random masking")
    return out


def load_torch_file(path: str, *, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """(state dict as `load_torch_state_dict`, the settings the file records beside the weights: mae_st's
    `args` (settings_from_args) or PySlowFast's `cfg` (settings_from_cfg))."""
    import torch  # noqa: PLC0415 (torch is only needed here)

    def load(weights_only):
        return torch.load(path, map_location="cpu", weights_only=weights_only)

    try:
        ckpt = load(not allow_pickle)
    except pickle.UnpicklingError as err:  # mae_st stores its argparse.Namespace under "args"
        if allow_pickle:
            raise ValueError(f"{path}: not a torch file torch.load can read ({err})") from None
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = load(True)
        except pickle.UnpicklingError:
            raise ValueError(f"{path}: cannot be read with torch.load(weights_only=True) ({err}); "
                             f"if you trust the file, pass --allow_pickle") from None
    state = ckpt.state_dict() if hasattr(ckpt, "state_dict") else ckpt  # a pickled nn.Module
    for field in ("model", "model_state", "state_dict"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(field), dict):
            state = ckpt[field]
            break
    out, skipped = {}, []
    for key, value in state.items():
        if not torch.is_tensor(value):
            skipped.append(key)
            continue
        out[key.removeprefix("module.")] = _numpy(value)
    if skipped:
        logging.info("%s: skipped %d non-tensor entries: %s", path, len(skipped), skipped[:10])
    patch = out.get("patch_embed.proj.weight")
    width = int(patch.shape[0]) if patch is not None else None
    if isinstance(ckpt, dict) and "cfg" in ckpt and "args" not in ckpt:
        return out, settings_from_cfg(ckpt["cfg"], width)
    return out, settings_from_args(ckpt.get("args") if isinstance(ckpt, dict) else None, width)


# PySlowFast's MaskMViT names its MAE decoder `pred_head`: transforms.0 holds the decoder blocks then the
# decoder norm, projections.0 is decoder_pred; a separable decoder pos table is dec_pos_embed_*
PYSLOWFAST_DECODER = ((re.compile(r"^pred_head\.transforms\.0\.(\d+)\.(weight|bias)$"), r"decoder_norm.\2"),
                      (re.compile(r"^pred_head\.transforms\.0\.(\d+)\."), r"decoder_blocks.\1."),
                      (re.compile(r"^pred_head\.projections\.0\."), "decoder_pred."),
                      (re.compile(r"^dec_pos_embed_"), "decoder_pos_embed_"))


MULTISCALE_PREFIX = "decoder_of_another_depth."  # PySlowFast's heads on more encoder depths: no MAE-ST counterpart


def is_pyslowfast_mae(state_dict: dict) -> bool:
    """A PySlowFast MaskMViT pre-training state dict (its decoder under `pred_head`)."""
    return any(k.removeprefix("module.").startswith("pred_head.") for k in state_dict)


def canonical(state_dict: dict) -> dict[str, np.ndarray]:
    """mae_st key names: strip `module.`, split fused `attn.qkv`, `head.projection` -> `head`, and
    PySlowFast's MaskMViT decoder (`pred_head.*`, `dec_pos_embed_*`) -> `decoder_*`."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if re.match(r"^pred_head\.(transforms|projections)\.[1-9]", key):  # dropped unless kind='pretrain'
            key = MULTISCALE_PREFIX + key
        for pattern, replacement in PYSLOWFAST_DECODER:
            if pattern.match(key):
                key = pattern.sub(replacement, key, count=1)
                break
        value = _numpy(value)
        fused = re.fullmatch(r"(.*\.attn)\.qkv\.(weight|bias)", key)
        if fused:  # [3E, E] / [3E] -> q, k, v
            for name, part in zip("qkv", np.split(value, 3, axis=0)):
                out[f"{fused[1]}.{name}.{fused[2]}"] = part
            continue
        out[re.sub(r"^head\.projection\.", "head.", key)] = value
    return out


# --- what the shapes say ------------------------------------------------------------------------
def _depth(sd, prefix):
    return len({int(m[1]) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))})


def _facts(sd: dict) -> dict:
    """Settings readable from a canonical state dict's names and shapes (only those present)."""
    f = {"cls_embed": "cls_token" in sd, "sep_pos_embed": "pos_embed_spatial" in sd,
         "depth": _depth(sd, "blocks")}
    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 5:  # [E, C, t, p, p]
        f.update(embed_dim=w.shape[0], in_chans=w.shape[1], t_patch_size=w.shape[2], patch_size=w.shape[3])
    if "blocks.0.mlp.fc1.weight" in sd:
        fc1 = sd["blocks.0.mlp.fc1.weight"]
        f["mlp_ratio"] = fc1.shape[0] / fc1.shape[1]
    if "blocks.0.attn.q.weight" in sd:
        f["qkv_bias"] = "blocks.0.attn.q.bias" in sd
    for name, key in (("spatial_tokens", "pos_embed_spatial"), ("temporal_tokens", "pos_embed_temporal"),
                      ("pos_tokens", "pos_embed")):
        if key in sd:
            f[name] = sd[key].shape[1]
    if "decoder_embed.weight" in sd:
        f["decoder_embed_dim"] = sd["decoder_embed.weight"].shape[0]
        f["decoder_depth"] = _depth(sd, "decoder_blocks")
        f["decoder_sep_pos_embed"] = "decoder_pos_embed_spatial" in sd
        f["decoder_cls"] = "encoder" if f["cls_embed"] and "decoder_cls_token" not in sd else "token"
    if "decoder_pred.weight" in sd:
        f["pred_dim"] = sd["decoder_pred.weight"].shape[0]
    if "head.weight" in sd:
        f["num_classes"] = sd["head.weight"].shape[0]
    return f


def _kind_of(sd) -> str:
    return "pretrain" if "decoder_embed.weight" in sd else "classifier" if "head.weight" in sd else "encoder"


def _kind(model_config: dict, sd: dict | None = None) -> str:
    """The config's `kind`; else 'classifier' if it has num_classes; else the checkpoint's (or 'pretrain')."""
    if "kind" in model_config:
        return model_config["kind"]
    if "num_classes" in model_config:
        return "classifier"
    return _kind_of(sd) if sd is not None else "pretrain"


def default_num_heads(width: int, head_dim: int = 64) -> int:
    return DEFAULT_HEADS.get(width, max(1, width // head_dim))


def _settings_of(kind: str) -> set[str]:
    """Every constructor argument of the `kind` model (through its base classes), plus `kind`."""
    names = {"kind"}
    for c in KINDS[kind].__mro__:
        if "__init__" in vars(c):
            names |= {n for n, prm in inspect.signature(c.__init__).parameters.items()
                      if n not in ("self", "rngs") and prm.kind not in (prm.VAR_KEYWORD, prm.VAR_POSITIONAL)}
    return names


def infer_model_config(state_dict: dict, hints: dict | None = None, **overrides) -> dict:
    """Constructor kwargs (plus `kind`) read from a state dict's shapes; `overrides` win.

    Not in the shapes: num_heads (default per width), decoder_num_heads (16, as mae_st;
    PySlowFast uses 8), and, for a joint pos table, how its tokens split into T' x H' x W'
    (from `num_frames` or `img_size` in overrides, else num_frames=16). `hints` (a mae_st file's
    `args`, settings_from_args) fill those before the defaults; settings the kind's model does not
    take are dropped from them, and refused in `overrides`.
    """
    sd = canonical(state_dict)
    f = _facts(sd)
    if "patch_size" not in f:
        raise ValueError("no patch_embed.proj.weight [E, C, t, p, p]: not an MAE-ST ViT state dict")
    kind = overrides.get("kind", _kind_of(sd))
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {sorted(KINDS)}")
    known = _settings_of(kind)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"--config.model.{unknown[0]}: not a setting of a {kind} model (its settings: "
                         f"{', '.join(sorted(known))})")
    hints = {k: v for k, v in (hints or {}).items() if k in known}
    p, t, e = f["patch_size"], f["t_patch_size"], f["embed_dim"]
    if f["sep_pos_embed"]:
        if "temporal_tokens" not in f:
            raise ValueError("the state dict has pos_embed_spatial but misses the key pos_embed_temporal")
        spatial, temporal = f["spatial_tokens"], f["temporal_tokens"]
        if hints.pop("num_frames", temporal * t) != temporal * t:
            logging.warning("the checkpoint's args or cfg say num_frames, its pos_embed_temporal %d x t_patch_size %d: "
                            "the table wins", temporal, t)
    elif "pos_tokens" in f:
        length = f["pos_tokens"] - int(f["cls_embed"])
        if "img_size" in overrides:
            spatial = (overrides["img_size"] // p) ** 2
            temporal = length // spatial
        else:
            temporal = overrides.get("num_frames", hints.pop("num_frames", 16)) // t
            spatial = length // max(temporal, 1)
        if spatial * temporal != length or math.isqrt(spatial) ** 2 != spatial:
            raise ValueError(f"the joint pos_embed's {length} patch tokens do not split into T'={temporal} x a "
                             f"square H'xW' grid: set --config.model.num_frames or --config.model.img_size")
    else:
        raise ValueError("no pos_embed / pos_embed_spatial in the state dict: cannot infer the token grid")
    side = math.isqrt(spatial)
    if side * side != spatial:
        raise ValueError(f"{spatial} spatial tokens is not a square grid: set --config.model.num_frames "
                         f"or --config.model.img_size")
    config = dict(kind=kind, img_size=side * p, patch_size=p, num_frames=temporal * t, t_patch_size=t,
                  in_chans=f["in_chans"], embed_dim=e, depth=f["depth"], num_heads=default_num_heads(e),
                  mlp_ratio=f.get("mlp_ratio", 4.0), qkv_bias=f.get("qkv_bias", True),
                  sep_pos_embed=f["sep_pos_embed"], cls_embed=f["cls_embed"])
    if kind == "pretrain":
        if "decoder_embed_dim" not in f:
            raise ValueError("kind='pretrain' needs a checkpoint with a decoder (decoder_embed.weight)")
        d = f["decoder_embed_dim"]
        u = f.get("pred_dim", 0) // (p * p * f["in_chans"]) or t  # no decoder_pred: torch_to_params says so
        pyslowfast = is_pyslowfast_mae(state_dict)  # 64-wide decoder heads, every other frame as the target
        config.update(decoder_embed_dim=d, decoder_depth=f["decoder_depth"],
                      decoder_num_heads=max(1, d // 64) if pyslowfast else 16 if d % 16 == 0 else default_num_heads(d),
                      pred_t_dim=u * temporal, decoder_cls=f["decoder_cls"],
                      decoder_pos_table=_pos_table(f["decoder_sep_pos_embed"], f["sep_pos_embed"]))
        if pyslowfast:
            config["target_frames"] = "stride"
    if kind == "classifier":
        if "num_classes" not in f and "num_classes" not in overrides:
            raise ValueError("the checkpoint has no head: set --config.model.num_classes for kind='classifier'")
        config["num_classes"] = f.get("num_classes")
    hints.pop("num_frames", None)
    if hints:
        logging.info("from the settings the checkpoint saved beside its weights: %s", hints)
    config.update(hints)
    config.update(overrides)
    for heads, width in (("num_heads", "embed_dim"), ("decoder_num_heads", "decoder_embed_dim")):
        if heads in config and config[width] % config[heads]:
            raise ValueError(f"{heads}={config[heads]} does not divide {width}={config[width]}: set "
                             f"--config.model.{heads}")
    return config


# --- comparing a state dict with a config -------------------------------------------------------
def _defaults(cls) -> dict:
    out = {}
    for c in reversed(cls.__mro__):
        if "__init__" in vars(c):
            for name, prm in inspect.signature(c.__init__).parameters.items():
                if prm.default is not inspect.Parameter.empty:
                    out[name] = prm.default
    return out


def _setting_error(name, found, wanted) -> ValueError:
    return ValueError(f"checkpoint has {name}={found}, config says {wanted}: set --config.model.{name}={found}")


def check_settings(state_dict: dict, model_config: dict) -> None:
    """Raise a ValueError naming the first setting of `model_config` the checkpoint disagrees with."""
    sd = canonical(state_dict)
    f = _facts(sd)
    kind = _kind(model_config, sd)
    cfg = {**_defaults(KINDS[kind]), **model_config}
    for name in ("patch_size", "t_patch_size", "in_chans", "embed_dim", "depth", "mlp_ratio", "qkv_bias",
                 "cls_embed", "sep_pos_embed"):
        if name in f and f[name] != cfg[name]:
            raise _setting_error(name, f[name], cfg[name])
    p, t = cfg["patch_size"], cfg["t_patch_size"]
    gt, gs = cfg["num_frames"] // t, (cfg["img_size"] // p) ** 2
    if "spatial_tokens" in f and f["spatial_tokens"] != gs:
        side = math.isqrt(f["spatial_tokens"])
        found = side * p if side * side == f["spatial_tokens"] else f"?({f['spatial_tokens']} tokens)"
        raise _setting_error("img_size", found, cfg["img_size"])
    if "temporal_tokens" in f and f["temporal_tokens"] != gt:
        raise _setting_error("num_frames", f["temporal_tokens"] * t, cfg["num_frames"])
    if "pos_tokens" in f and f["pos_tokens"] - int(f["cls_embed"]) != gt * gs:
        length = f["pos_tokens"] - int(f["cls_embed"])
        hint = f" (num_frames={length // gs * t} at img_size={cfg['img_size']})" if length % gs == 0 else ""
        raise ValueError(f"checkpoint's pos_embed has {length} patch tokens, config implies "
                         f"{gt}x{gs} = {gt * gs}: set --config.model.num_frames / img_size{hint}")
    if kind == "pretrain" and "decoder_embed_dim" in f:
        table = cfg["decoder_pos_table"]
        if f["decoder_sep_pos_embed"] != decoder_table_separate(table, cfg["sep_pos_embed"]):
            raise _setting_error("decoder_pos_table", _pos_table(f["decoder_sep_pos_embed"], cfg["sep_pos_embed"]),
                                 table)
        for name in ("decoder_embed_dim", "decoder_depth", "decoder_cls"):
            if f[name] != cfg[name]:
                raise _setting_error(name, f[name], cfg[name])
        u = f.get("pred_dim", 0) // (p * p * cfg["in_chans"])
        if "pred_dim" in f and u * gt != cfg["pred_t_dim"]:
            raise _setting_error("pred_t_dim", u * gt, cfg["pred_t_dim"])
    if kind == "classifier" and "num_classes" in f and f["num_classes"] != cfg["num_classes"]:
        raise _setting_error("num_classes", f["num_classes"], cfg["num_classes"])


def _pos_table(decoder_separate: bool, encoder_separate: bool) -> str:
    """MaskedAutoencoder's decoder_pos_table for a decoder table laid out so, beside such an encoder's."""
    return "same" if decoder_separate == encoder_separate else "separate" if decoder_separate else "joint"


# --- our tree <-> torch keys ----------------------------------------------------------------------
def build_model(model_config: dict, rngs: nnx.Rngs | None = None):
    """The NNX model a config describes (`kind` picks the class); abstract (no arrays) without rngs."""
    config = dict(model_config)
    cls = KINDS[_kind(config)]
    config.pop("kind", None)
    if rngs is None:
        return nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0), **config))
    return cls(rngs=rngs, **config)


@functools.lru_cache(maxsize=16)
def _abstract_split(config_json: str):
    return nnx.split(build_model(json.loads(config_json)), nnx.Param)


def _abstract(model_config: dict):
    """(graphdef, abstract param State) of a config's model, cached per config."""
    try:
        graphdef, state = _abstract_split(json.dumps(model_config, sort_keys=True))
    except TypeError:  # a value JSON cannot key: no caching
        return nnx.split(build_model(model_config), nnx.Param)
    return graphdef, jax.tree.map(lambda x: x, state)  # a fresh State over the shared leaves


def _abstract_params(model_config: dict) -> dict:
    """{path tuple: ShapeDtypeStruct} of the config's parameter tree."""
    return traverse_util.flatten_dict(nnx.to_pure_dict(_abstract(model_config)[1]))


def _torch_key(path: tuple) -> str:
    """The torch state-dict key of one of our leaves: ('blocks', 3, 'attn', 'q', 'kernel') ->
    'blocks.3.attn.q.weight' (our blocks are per layer, as the reference's)."""
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1]) if len(path) > 1 else path[-1]
    return _dotted(path[:-1] + (leaf,))


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _to_torch(value, leaf: str):
    """Linear kernel [in, out] -> weight [out, in]; conv [t, p, p, I, O] -> [O, I, t, p, p]."""
    if leaf != "kernel":
        return value
    return value.T if value.ndim == 2 else value.transpose(4, 3, 0, 1, 2)


def _from_torch(value, leaf: str):
    if leaf != "kernel":
        return value
    return value.T if value.ndim == 2 else value.transpose(2, 3, 4, 1, 0)


def _names(keys, limit=20) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def torch_to_params(state_dict: dict, model_config: dict) -> dict:
    """Our nested param dict (numpy, fp32 where the model is) from a torch state dict.

    A pre-training checkpoint read as kind='classifier' or 'encoder' drops its decoder (logged);
    a classifier without a head in the file gets no 'head' entry (keep the initialised one).
    """
    sd = canonical(state_dict)
    check_settings(sd, model_config)
    kind = _kind(model_config, sd)
    if kind == "classifier" and "head.weight" in sd and not model_config.get("cls_embed", False):
        logging.warning("a fine-tuned classifier without a class token: mae_st's pools its patch tokens after "
                        "dropping token 0 (meant for the class token), ours pools them all, so the logits differ")
    if kind == "pretrain" and any(k.startswith(MULTISCALE_PREFIX) for k in sd):
        raise ValueError("the checkpoint predicts from several encoder depths (PySlowFast's MASK.PRETRAIN_DEPTH "
                         "with more than one): no MAE-ST model holds that; import its encoder with "
                         "--config.kind=encoder")
    abstract = _abstract_params({**model_config, "kind": kind})
    if kind == "classifier" and not any(k.startswith("head.") for k in sd):
        logging.info("no head in the checkpoint: the classifier head stays initialised")
        abstract = {path: v for path, v in abstract.items() if path[0] != "head"}
    dropped = [k for k in sd if (kind != "pretrain" and DECODER_KEY.match(k))
               or (kind == "encoder" and k.startswith("head."))]
    if dropped:
        logging.info("dropping %d %s keys not used by a %s model", len(dropped),
                     "decoder/head" if kind == "encoder" else "decoder", kind)
    wanted = {_torch_key(path): path for path in abstract}
    missing, unexpected = set(wanted) - set(sd), set(sd) - set(wanted) - set(dropped)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit a {kind} model: missing keys [{_names(missing)}]; "
                         f"unexpected keys [{_names(unexpected)}]")
    bad = []
    for key, path in wanted.items():
        expect = _to_torch(np.empty(abstract[path].shape, np.int8), path[-1]).shape
        if sd[key].shape != expect:
            bad.append(f"{key} {tuple(sd[key].shape)} (config implies {expect})")
    if bad:
        raise ValueError(f"shapes differ from the config: {'; '.join(bad[:10])}")
    flat = {}
    for path, leaf in abstract.items():
        flat[path] = np.asarray(_from_torch(sd[_torch_key(path)], path[-1]), dtype=leaf.dtype)
    return traverse_util.unflatten_dict(flat)


def params_to_torch(params, model_config: dict | None = None) -> dict[str, np.ndarray]:
    """mae_st state dict (numpy) from our param tree; the inverse of `torch_to_params`.

    With `model_config`, the tree is first checked against the tree that config describes.
    """
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    flat = traverse_util.flatten_dict(checkpoint.per_layer_blocks(params))
    if model_config is not None:
        abstract = _abstract_params(model_config)
        diff = set(abstract) ^ set(flat)
        if diff or any(tuple(np.shape(flat[k])) != abstract[k].shape for k in abstract):
            raise ValueError(f"params do not match model_config (differing: {sorted(_dotted(k) for k in diff)[:10]})")
    out = {}
    for path, value in flat.items():
        out[_torch_key(path)] = np.ascontiguousarray(_to_torch(np.asarray(value), path[-1]))
    return out


def to_pyslowfast(state: dict, decoder_depth: int) -> dict:
    """PySlowFast's names for a mae_st-named state dict (the inverse of canonical's renames): fused
    attn.qkv, head.projection, and a MaskMViT decoder under pred_head (blocks, then the norm at index
    decoder_depth, in transforms.0; decoder_pred as projections.0; dec_pos_embed_* for separate tables)."""
    renames = ((r"^decoder_blocks\.(\d+)\.", r"pred_head.transforms.0.\1."),
               (r"^decoder_norm\.", f"pred_head.transforms.0.{decoder_depth}."),
               (r"^decoder_pred\.", "pred_head.projections.0."), (r"^decoder_pos_embed_", "dec_pos_embed_"),
               (r"^head\.", "head.projection."))
    out = {}
    for key, value in state.items():
        split = re.fullmatch(r"(.*\.attn)\.([qkv])\.(weight|bias)", key)
        if split and split[2] != "q":
            continue
        if split:
            value = np.concatenate([state[f"{split[1]}.{n}.{split[3]}"] for n in "qkv"], axis=0)
            key = f"{split[1]}.qkv.{split[3]}"
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key, count=1)
        out[key] = value
    return out


def pyslowfast_cfg(model_config: dict) -> str:
    """The part of a PySlowFast cfg (YAML) that settings_from_cfg reads back: what the shapes do not show."""
    import yaml  # noqa: PLC0415

    cfg = {"MVIT": {"EMBED_DIM": int(model_config["embed_dim"]), "NUM_HEADS": int(model_config["num_heads"])},
           "DATA": {"NUM_FRAMES": int(model_config["num_frames"])},
           "MASK": {"MAE_ON": True, "NORM_PRED_PIXEL": bool(model_config.get("norm_pix_loss", True))},
           "AUG": {"MASK_RATIO": float(model_config.get("mask_ratio", 0.9)),
                   "MASK_TUBE": model_config.get("mask_strategy", "random") == "tube"}}
    return yaml.safe_dump(cfg)


# --- notebook API -----------------------------------------------------------------------------------
def complete_params(params: dict, model_config: dict, seed: int = 0) -> dict:
    """Fill leaves the checkpoint lacked (a fresh classifier head) from an initialised model."""
    flat = traverse_util.flatten_dict(checkpoint.per_layer_blocks(params))
    missing = [k for k in _abstract_params(model_config) if k not in flat]
    if not missing:
        return params

    @jax.jit
    def init_missing():  # only the missing leaves are returned, so XLA drops the rest of the init
        fresh = nnx.to_pure_dict(nnx.split(build_model(model_config, nnx.Rngs(seed)), nnx.Param)[1])
        fresh = traverse_util.flatten_dict(fresh)
        return {_dotted(k): fresh[k] for k in missing}

    filled = init_missing()
    logging.info("initialised %d parameters the checkpoint lacks: %s", len(missing), sorted(filled))
    return traverse_util.unflatten_dict({**flat, **{k: np.asarray(filled[_dotted(k)]) for k in missing}})


def model_from_params(params: dict, model_config: dict):
    """An NNX model holding `params` (a nested dict in our layout)."""
    graphdef, state = _abstract(model_config)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def load_into_model(path: str, *, allow_pickle: bool = False, **overrides):
    """A MaskedAutoencoder / VideoClassifier / VideoEncoder (by `kind`) with a torch file's weights.

    `overrides` are constructor kwargs (num_heads=16, attention_impl='cudnn', ...) or
    kind='classifier', num_classes=K to fine-tune from pre-training weights.
    """
    state_dict, hints = load_torch_file(path, allow_pickle=allow_pickle)
    config = infer_model_config(state_dict, hints, **overrides)
    params = complete_params(torch_to_params(state_dict, config), config)
    return model_from_params(params, config)


# --- command line ---------------------------------------------------------------------------------
FLAGS = flags.FlagValues()  # private: importing this module adds no global flags
flags.DEFINE_string("input", None, "a .pth/.pyth file (import) or our parameter directory (--export)",
                    flag_values=FLAGS)
flags.DEFINE_string("output", None, "our parameter directory (import) or a .pth file (--export)", flag_values=FLAGS)
flags.DEFINE_bool("export", False, "write a mae_st .pth from our parameter directory (a PySlowFast .pyth for a "
                  "model with PySlowFast's decoder, decoder_cls=encoder)", flag_values=FLAGS)
flags.DEFINE_bool("allow_pickle", False, "torch.load with weights_only=False (trusted files only)",
                  flag_values=FLAGS)


def parse_overrides(args: list[str]) -> dict:
    """['--config.num_heads=16', '--config.model.kind=classifier'] -> {'num_heads': 16, 'kind': 'classifier'}."""
    out = {}
    for arg in args:
        name, sep, text = arg.removeprefix("--config.").partition("=")
        if not sep:
            raise ValueError(f"{arg}: write overrides as --config.<field>=<value>")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = {"true": True, "false": False}.get(text.lower(), text)
        out[name.removeprefix("model.")] = value
    return out


def convert(input_path: str, output: str, *, export: bool = False, overrides: dict | None = None,
            allow_pickle: bool = False) -> dict:
    """The CLI's work: torch file -> `checkpoint.save_params` directory, or back with `export`.
    Returns the model config written (import) or read (export)."""
    if export:
        import torch  # noqa: PLC0415

        params, config = checkpoint.load_params(input_path)
        state = params_to_torch(params, config)
        if config.get("decoder_cls") == "encoder":  # PySlowFast's MaskMViT decoder: its layout and names
            state = to_pyslowfast(state, config["decoder_depth"])
            torch.save({"model_state": {k: torch.from_numpy(v) for k, v in state.items()},
                        "cfg": pyslowfast_cfg(config)}, output)
            logging.info("wrote %d tensors in PySlowFast's layout (MaskMViT) to %s", len(state), output)
            return config
        torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}}, output)
        logging.info("wrote %d tensors to %s", len(state), output)
        return config
    state_dict, hints = load_torch_file(input_path, allow_pickle=allow_pickle)
    config = infer_model_config(state_dict, hints, **(overrides or {}))
    params = complete_params(torch_to_params(state_dict, config), config)
    checkpoint.save_params(output, params, config)
    logging.info("wrote %s params (%s) to %s", config["kind"], config, output)
    return config


def main(argv: list[str]) -> None:
    if {"-h", "--help", "--helpfull"} & set(argv[1:]):
        raise SystemExit(f"{__doc__}\n{FLAGS.get_help()}")
    config_args = [a for a in argv[1:] if a.startswith("--config.")]
    FLAGS.unparse_flags()
    FLAGS([argv[0]] + [a for a in argv[1:] if not a.startswith("--config.")])
    if not FLAGS.input or not FLAGS.output:
        raise SystemExit(f"usage: {__doc__}\n{FLAGS.get_help()}")
    try:
        convert(FLAGS.input, FLAGS.output, export=FLAGS.export, overrides=parse_overrides(config_args),
                allow_pickle=FLAGS.allow_pickle)
    except (ValueError, OSError) as e:  # a wrong file, setting or path: one line, no traceback
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    main(sys.argv)
