"""Reconstruction figures: original, masked input and reconstruction of a clip, as a PNG grid or a GIF.

    python -m mae_st_jax.visualize --init_from=DIR --video=FILE --output=OUT.gif|OUT.png
        [--mask_ratio=0.9,0.95,0.98] [--seed=0] [--start_frame=-1] [--sampling_rate=0]
        [--mask_strategy=random|tube|frame|block] [--norm_pix_loss=auto|true|false]

DIR is a pre-training workdir of ours (its newest checkpoint) or a parameter directory written by
`python -m mae_st_jax.convert.from_torch`; the model is built from its `model.json`. The clip is
`num_frames` frames at the sampling rate of the workdir's `config.json` (else 4), short side resized
and centre-cropped to `img_size`, normalised with the training mean/std (else 0.45/0.225).

Rows per mask ratio: the original, the masked input (masked patches grey) and the reconstruction
(visible patches pasted from the original, masked patches from the prediction), at the frames the
decoder predicts (`pred_t_dim` of them, `model.target_frames`). With norm_pix_loss the decoder
predicts per-patch normalised pixels; each masked patch gets the true mean and variance of the
original patch back (as MAE's demo does) and the caption says so. One ratio's masks contain the
smaller ratios' masks (the same noise ranks the patches).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from PIL import Image, ImageDraw, ImageFont

from mae_st_jax import fileio, masking
from mae_st_jax.data import augment, sampling, video_io
from mae_st_jax.models import layers

DEFAULT_MEAN, DEFAULT_STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
DEFAULT_SAMPLING_RATE, DEFAULT_TARGET_FPS = 4, 30.0
MASK_GREY = 128  # uint8 value of masked patches in the "masked" row
# layout in pixels: frames are upscaled (nearest) by an integer factor to at least PANEL_MIN wide
PANEL_MIN, MARGIN, GAP, LABEL_W, LINE_H = 96, 4, 2, 64, 14
GIF_FRAME_MS = 400
RECON_NOTE = "reconstruction: visible patches from the original, masked patches from the prediction"
NORM_PIX_NOTE = "norm-pix: patch mean/var from the original"


# --- the numbers ---------------------------------------------------------------------------------
def unnormalize_patches(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Undo norm_pix_loss: each predicted token [.., D] times the true std plus the true mean of the
    original token (unbiased variance + 1e-6, the inverse of models.mae.norm_pix_target)."""
    mean = target.mean(axis=-1, keepdims=True)
    std = jnp.sqrt(target.var(axis=-1, keepdims=True, ddof=1) + 1e-6)
    return pred * std + mean


def composite(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Tokens [B, L, D]: the prediction where mask [B, L] is 1 (removed), the original elsewhere (exactly)."""
    return jnp.where(mask[..., None] > 0, pred, target)


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """One clip at the frames the decoder predicts; pixels in the model's normalised space."""

    original: np.ndarray  # [T', H, W, C] the input at the predicted frames
    reconstruction: np.ndarray  # [T', H, W, C] visible patches from `original`, masked ones predicted
    mask: np.ndarray  # [T', H, W] bool, True where the patch was removed
    mask_ratio: float
    num_visible: int
    num_patches: int
    loss: float  # the model's loss on the masked patches (normalised-patch space with norm-pix)
    frames: tuple[int, ...]  # index in the clip of each frame shown (model.target_frames)
    norm_pix: bool


@functools.partial(nnx.jit, static_argnames=("mask_ratio",))
def _predict(model, video, noise, mask_ratio):
    loss, pred, mask = model(video, noise, mask_ratio=mask_ratio)
    target = model.target(video)  # [B, L, u*p*p*C], un-normalised
    if model.norm_pix_loss:
        pred = unnormalize_patches(pred, target)
    g = model.geometry

    def frames(tokens):  # [B, L, u*p*p*C] -> [B, pred_t_dim, H, W, C]
        return layers.unpatchify(tokens, g.grid, model.t_pred_patch, g.patch_size, model.in_chans)

    pixel_mask = frames(jnp.broadcast_to(mask[..., None], target.shape))[..., 0] > 0
    return loss, frames(target), frames(composite(pred, target, mask)), pixel_mask


def reconstruct(model, video: jax.Array, noise: jax.Array, mask_ratio: float | None = None) -> list[Reconstruction]:
    """One Reconstruction per clip of `video` [B, T, H, W, C] (normalised) with the mask `noise` [B, L] gives."""
    ratio = model.mask_ratio if mask_ratio is None else float(mask_ratio)
    loss, original, recon, pixel_mask = jax.device_get(_predict(model, video, noise, ratio))
    kept = model.num_visible(ratio)
    return [Reconstruction(np.asarray(original[b]), np.asarray(recon[b]), np.asarray(pixel_mask[b]), ratio, kept,
                           model.geometry.num_patches, float(loss), tuple(model.target_frames),
                           bool(model.norm_pix_loss))
            for b in range(video.shape[0])]


def to_uint8(x: np.ndarray, mean, std) -> np.ndarray:
    """Normalised pixels [.., C] -> uint8 (rounded, so normalised uint8 input comes back unchanged)."""
    x = np.asarray(x, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def rows_uint8(rec: Reconstruction, mean, std) -> dict[str, np.ndarray]:
    """{'original', 'masked', 'reconstruction'}: uint8 [T', H, W, C]; masked patches MASK_GREY."""
    original = to_uint8(rec.original, mean, std)
    masked = np.where(rec.mask[..., None], np.uint8(MASK_GREY), original)
    return {"original": original, "masked": masked, "reconstruction": to_uint8(rec.reconstruction, mean, std)}


# --- drawing ----------------------------------------------------------------------------------------
def panel_scale(size: int) -> int:
    """Integer upscaling that makes a frame of `size` pixels at least PANEL_MIN wide."""
    return max(1, -(-PANEL_MIN // size))


def _font():
    return ImageFont.load_default()


def _wrap(text: str, width: int, draw: ImageDraw.ImageDraw, font) -> list[str]:
    """Greedy word wrap of one caption line to `width` pixels."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def _caption_lines(captions: list[str], width: int) -> list[str]:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font()
    return [line for text in captions for line in _wrap(text, width, draw, font)]


def _paste(canvas: Image.Image, frame: np.ndarray, top: int, left: int, scale: int) -> None:
    image = Image.fromarray(frame)
    if scale > 1:
        image = image.resize((frame.shape[1] * scale, frame.shape[0] * scale), Image.NEAREST)
    canvas.paste(image, (left, top))


def grid_image(groups: list[tuple[str, dict[str, np.ndarray]]], captions: list[str]):
    """A PNG-style figure: caption lines, then per group a label line and three rows (original,
    masked, reconstruction) with the frames left to right. Returns (PIL image, boxes) where
    boxes[(group, row, t)] = (top, left, height, width) of each frame in the image."""
    first = groups[0][1]["original"]
    t, h, w = first.shape[:3]
    scale = panel_scale(max(h, w))
    ph, pw = h * scale, w * scale
    width = 2 * MARGIN + LABEL_W + t * pw + (t - 1) * GAP
    lines = _caption_lines(captions, width - 2 * MARGIN)
    group_h = LINE_H + 3 * ph + 2 * GAP
    height = 2 * MARGIN + len(lines) * LINE_H + len(groups) * group_h + (len(groups) - 1) * GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font()
    for i, line in enumerate(lines):
        draw.text((MARGIN, MARGIN + i * LINE_H), line, fill=(0, 0, 0), font=font)
    boxes = {}
    top = MARGIN + len(lines) * LINE_H
    for g, (label, rows) in enumerate(groups):
        draw.text((MARGIN, top), label, fill=(0, 0, 0), font=font)
        top += LINE_H
        for r, (name, short) in enumerate((("original", "original"), ("masked", "masked"),
                                           ("reconstruction", "recon."))):
            y = top + r * (ph + GAP)
            draw.text((MARGIN, y + ph // 2 - LINE_H // 2), short, fill=(0, 0, 0), font=font)
            for k in range(t):
                x = MARGIN + LABEL_W + k * (pw + GAP)
                _paste(canvas, rows[name][k], y, x, scale)
                boxes[(g, name, k)] = (y, x, ph, pw)
        top += 3 * ph + 2 * GAP + GAP
    return canvas, boxes


def gif_frames(groups: list[tuple[str, dict[str, np.ndarray]]], captions: list[str],
               frame_captions: list[str]) -> list[Image.Image]:
    """One image per shown frame: caption lines (frame_captions[t] first), column titles, then per
    group one row of three panels (original | masked | reconstruction) with its label on the left."""
    first = groups[0][1]["original"]
    t, h, w = first.shape[:3]
    scale = panel_scale(max(h, w))
    ph, pw = h * scale, w * scale
    width = 2 * MARGIN + LABEL_W + 3 * pw + 2 * GAP
    font = _font()
    images = []
    all_lines = [_caption_lines([frame_captions[k]] + captions, width - 2 * MARGIN) for k in range(t)]
    num_lines = max(len(lines) for lines in all_lines)  # every frame the same size
    height = 2 * MARGIN + (num_lines + 1) * LINE_H + len(groups) * ph + (len(groups) - 1) * GAP
    for k in range(t):
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for i, line in enumerate(all_lines[k]):
            draw.text((MARGIN, MARGIN + i * LINE_H), line, fill=(0, 0, 0), font=font)
        top = MARGIN + num_lines * LINE_H
        for c, title in enumerate(("original", "masked", "reconstruction")):
            draw.text((MARGIN + LABEL_W + c * (pw + GAP), top), title, fill=(0, 0, 0), font=font)
        top += LINE_H
        for g, (label, rows) in enumerate(groups):
            y = top + g * (ph + GAP)
            draw.text((MARGIN, y + ph // 2 - LINE_H // 2), label, fill=(0, 0, 0), font=font)
            for c, name in enumerate(("original", "masked", "reconstruction")):
                _paste(canvas, rows[name][k], y, MARGIN + LABEL_W + c * (pw + GAP), scale)
        images.append(canvas)
    return images


def save_gif(path: str, images: list[Image.Image], frame_ms: int = GIF_FRAME_MS) -> None:
    fileio.save_image(path, images[0], save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


def _notes(norm_pix: bool) -> list[str]:
    return [RECON_NOTE] + ([NORM_PIX_NOTE] if norm_pix else [])


def _ratio_label(rec: Reconstruction, long: bool) -> str:
    pct = f"{rec.mask_ratio * 100:g}%"
    if not long:
        return f"mask {pct}"
    return f"mask {pct}: {rec.num_visible} of {rec.num_patches} patches visible, loss {rec.loss:.4f}"


# --- training's figure ------------------------------------------------------------------------------
def reconstruction_figure(config, graphdef, params, source, path: str, indices=(0, 1, 2), seed: int = 0,
                          mask_ratio: float | None = None) -> np.ndarray:
    """Write a PNG with three rows per clip: original, masked input (masked patches grey) and
    reconstruction (visible patches pasted back), at the frames the decoder predicts."""
    from mae_st_jax.train.step import normalize
    model = nnx.merge(graphdef, params)
    groups, norm_pix = [], False
    for i, index in enumerate(i for i in indices if i < len(source)):
        info = source.info(index)
        idx = sampling.test_clip(0, 1, info.num_frames, config.model.num_frames, config.data.sampling_rate,
                                 info.fps, config.data.target_fps)
        frames = augment.center_crop(source.frames(index, idx), config.model.img_size)  # real videos: any size
        video = normalize(jnp.asarray(frames)[None], config.data.mean, config.data.std)
        noise = model.make_noise(jax.random.fold_in(jax.random.key(seed), i), 1)
        rec = reconstruct(model, video, noise, mask_ratio)[0]
        norm_pix = rec.norm_pix
        groups.append((f"clip {index}, {_ratio_label(rec, long=True)}", rows_uint8(rec, config.data.mean,
                                                                                   config.data.std)))
    image, _ = grid_image(groups, [f"frames {list(model.target_frames)} of each clip"] + _notes(norm_pix))
    fileio.save_image(path, image)
    return np.asarray(image)


# --- loading a checkpoint and a video ---------------------------------------------------------------
def fail(message: str):
    """Stop with a one-line message (the CLI's user errors)."""
    raise SystemExit("visualize: " + " ".join(str(message).split()))


@dataclasses.dataclass
class Checkpoint:
    model_config: dict  # MaskedAutoencoder kwargs from model.json (no 'kind')
    data: dict  # mean, std, sampling_rate, target_fps (from config.json or the defaults)


def read_checkpoint_settings(directory: str) -> Checkpoint:
    """Model and data settings of a pre-training checkpoint directory; SystemExit naming what is wrong."""
    from mae_st_jax.train import checkpoint
    if not directory:
        fail("--init_from is required: a pre-training workdir or a directory from convert.from_torch")
    if not fileio.isdir(directory):
        fail(f"--init_from={directory}: no such directory")
    path = os.path.join(directory, checkpoint.MODEL_JSON)
    if not fileio.exists(path):
        fail(f"--init_from={directory}: no {checkpoint.MODEL_JSON}, so not a pre-training workdir or a "
             f"convert.from_torch directory")
    try:
        model_config = json.loads(fileio.read_text(path))
    except (OSError, ValueError) as e:
        fail(f"{path}: unreadable ({e})")
    kind = model_config.pop("kind", "pretrain")
    if kind != "pretrain" or "num_classes" in model_config:
        fail(f"--init_from={directory} is a {kind if kind != 'pretrain' else 'classifier'} checkpoint, not a "
             f"pre-training one: reconstructions need the MAE decoder (use the pre-training workdir, or "
             f"convert.from_torch a pre-training .pth)")
    data = dict(mean=DEFAULT_MEAN, std=DEFAULT_STD, sampling_rate=DEFAULT_SAMPLING_RATE,
                target_fps=DEFAULT_TARGET_FPS)
    config_path = os.path.join(directory, "config.json")
    if fileio.exists(config_path):  # a workdir of ours: the training data settings
        try:
            saved = json.loads(fileio.read_text(config_path)).get("data", {})
        except (OSError, ValueError):
            saved = {}
        data.update({k: saved[k] for k in data if k in saved})
    return Checkpoint(model_config, data)


def build_model(directory: str, model_config: dict, **overrides):
    """A MaskedAutoencoder (fp32, default attention) with the directory's newest parameters."""
    from mae_st_jax.convert import from_torch
    from mae_st_jax.train import checkpoint
    config = {**model_config, "dtype": "float32", "attention_impl": "", "remat": "none",
              **{k: v for k, v in overrides.items() if v is not None}, "kind": "pretrain"}
    try:
        with warnings.catch_warnings():  # a workdir's arrays come back to the host: no sharding wanted
            warnings.filterwarnings("ignore", message="Sharding info not provided")
            params, _ = checkpoint.load_params(directory)
    except FileNotFoundError as e:
        fail(str(e))
    if "decoder_pred" not in params:
        fail(f"--init_from={directory}: the parameters have no decoder (a classifier or encoder checkpoint?)")
    try:
        return from_torch.model_from_params(params, config)
    except (ValueError, KeyError, TypeError) as e:
        fail(f"--init_from={directory}: parameters do not fit model.json ({e})")


def read_clip(path: str, num_frames: int, sampling_rate: int, img_size: int, *, start_frame: int = -1,
              target_fps: float = DEFAULT_TARGET_FPS) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [num_frames, img_size, img_size, 3], source frame indices) of one clip: the centre clip
    (start_frame < 0) or the one starting at start_frame; frames past the end repeat the last one."""
    if not os.path.isfile(path):
        fail(f"--video={path}: no such file")
    if sampling_rate < 1:
        fail(f"--sampling_rate={sampling_rate} must be >= 1")
    try:
        length, fps = video_io.probe(path)
    except video_io.DECODE_ERRORS as e:
        fail(f"cannot read video {path}: {type(e).__name__}: {e}")
    if length < 1:
        fail(f"--video={path}: no frames")
    if start_frame >= length:
        fail(f"--start_frame={start_frame} is past the video's {length} frames")
    span = sampling.clip_span(num_frames, sampling_rate, fps, target_fps)
    start = start_frame if start_frame >= 0 else sampling.start_index(length, span, 0, 1, None)
    indices = sampling.frame_indices(start, span, num_frames, length)
    try:
        frames = video_io.read_frames(path, indices, fps)
    except video_io.DECODE_ERRORS as e:
        fail(f"cannot read video {path}: {type(e).__name__}: {e}")
    if frames.shape[-1] != 3:
        fail(f"--video={path}: frames have {frames.shape[-1]} channels, not 3")
    return augment.center_crop(frames, img_size), indices


def parse_ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in str(text).split(",") if r.strip()]
    except ValueError:
        fail(f"--mask_ratio={text}: write numbers in [0, 1), comma-separated (0.9,0.95,0.98)")
    if not ratios or not all(0 <= r < 1 for r in ratios):
        fail(f"--mask_ratio={text}: each ratio must be in [0, 1)")
    return ratios


# --- the command ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    reconstructions: list[Reconstruction]  # one per mask ratio
    frames: np.ndarray  # the uint8 clip fed to the model [T, S, S, 3]
    indices: np.ndarray  # its frames' indices in the video
    boxes: dict  # PNG output: (group, row, t) -> (top, left, height, width); {} for a GIF
    mean: tuple
    std: tuple


def run(init_from: str, video: str, output: str, mask_ratios=(0.9,), *, seed: int = 0, start_frame: int = -1,
        sampling_rate: int = 0, mask_strategy: str = "", norm_pix_loss: bool | None = None) -> Result:
    """Reconstruct one clip of `video` at each mask ratio and write `output` (.gif or .png)."""
    from mae_st_jax.train.step import normalize
    ext = os.path.splitext(output)[1].lower()
    if ext not in (".gif", ".png"):
        fail(f"--output={output}: name a .gif or a .png file")
    ratios = parse_ratios(mask_ratios if isinstance(mask_ratios, str) else ",".join(map(str, mask_ratios)))
    ckpt = read_checkpoint_settings(init_from)
    m = ckpt.model_config
    for key in ("num_frames", "img_size", "patch_size", "t_patch_size"):
        if key not in m:
            fail(f"--init_from={init_from}: model.json has no {key}")
    grid = (m["num_frames"] // m["t_patch_size"],) + (m["img_size"] // m["patch_size"],) * 2
    strategy = mask_strategy or m.get("mask_strategy", "random")
    if strategy not in masking.STRATEGIES:
        fail(f"--mask_strategy={strategy}: choose one of {', '.join(masking.STRATEGIES)}")
    for r in ratios:
        try:
            masking.num_visible(strategy, grid, r)
        except ValueError as e:
            fail(f"--mask_ratio={r}: {e}")
    rate = sampling_rate or ckpt.data["sampling_rate"]
    frames, indices = read_clip(video, m["num_frames"], rate, m["img_size"], start_frame=start_frame,
                                target_fps=ckpt.data["target_fps"])
    model = build_model(init_from, m, mask_strategy=strategy, norm_pix_loss=norm_pix_loss, mask_ratio=ratios[0])
    mean, std = tuple(ckpt.data["mean"]), tuple(ckpt.data["std"])
    clip = normalize(jnp.asarray(frames)[None], mean, std)
    noise = model.make_noise(jax.random.key(seed), 1)  # shared: larger ratios mask a superset
    recs = [reconstruct(model, clip, noise, r)[0] for r in ratios]
    shown = [int(indices[i]) for i in model.target_frames]
    notes = _notes(recs[0].norm_pix)
    fileio.makedirs(os.path.dirname(output if fileio.is_url(output) else os.path.abspath(output)))
    name = os.path.basename(video)
    boxes = {}
    if ext == ".png":
        groups = [(_ratio_label(r, long=True), rows_uint8(r, mean, std)) for r in recs]
        image, boxes = grid_image(groups, [f"{name} - video frames {shown}"] + notes)
        fileio.save_image(output, image)
    else:
        groups = [(_ratio_label(r, long=False), rows_uint8(r, mean, std)) for r in recs]
        per_frame = [f"{name} - frame {k + 1}/{len(shown)} (video frame {f})" for k, f in enumerate(shown)]
        save_gif(output, gif_frames(groups, notes, per_frame))
    return Result(recs, frames, indices, boxes, mean, std)


FLAGS = flags.FlagValues()  # private: importing this module adds no global flags
flags.DEFINE_string("init_from", None, "pre-training workdir or convert.from_torch directory", flag_values=FLAGS)
flags.DEFINE_string("video", None, "a video file PyAV can read", flag_values=FLAGS)
flags.DEFINE_string("output", None, "OUT.gif (one frame per predicted frame) or OUT.png (a grid)",
                    flag_values=FLAGS)
flags.DEFINE_string("mask_ratio", "0.9", "mask ratio, or a comma list (0.9,0.95,0.98): one row group each",
                    flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the mask", flag_values=FLAGS)
flags.DEFINE_integer("start_frame", -1, "first video frame of the clip (-1: the centre clip)", flag_values=FLAGS)
flags.DEFINE_integer("sampling_rate", 0, "frame stride at target_fps (0: the workdir's config, else 4)",
                     flag_values=FLAGS)
flags.DEFINE_string("mask_strategy", "", "random | tube | frame | block ('': the model's)", flag_values=FLAGS)
flags.DEFINE_enum("norm_pix_loss", "auto", ["auto", "true", "false"],
                  "whether the decoder predicts normalised patches (auto: model.json)", flag_values=FLAGS)


def main(argv: list[str]) -> Result:
    if {"-h", "--help", "--helpfull"} & set(argv[1:]):
        raise SystemExit(f"{__doc__}\n{FLAGS.get_help()}")
    FLAGS.unparse_flags()
    try:
        FLAGS(list(argv))
    except flags.Error as e:
        fail(str(e))
    for name in ("init_from", "video", "output"):
        if not FLAGS[name].value:
            fail(f"--{name} is required (python -m mae_st_jax.visualize --help)")
    norm_pix = {"auto": None, "true": True, "false": False}[FLAGS.norm_pix_loss]
    return run(FLAGS.init_from, FLAGS.video, FLAGS.output, FLAGS.mask_ratio, seed=FLAGS.seed,
               start_frame=FLAGS.start_frame, sampling_rate=FLAGS.sampling_rate,
               mask_strategy=FLAGS.mask_strategy, norm_pix_loss=norm_pix)


if __name__ == "__main__":
    main(sys.argv)
    print(f"wrote {FLAGS.output}")
