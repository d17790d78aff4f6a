"""Reconstruction figures: original, masked input and reconstruction of one clip, side by side."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from mae_st_jax.data import augment, sampling
from mae_st_jax.models import layers


def reconstruct(model, video: jax.Array, noise: jax.Array, mask_ratio: float | None = None):
    """(masked input, reconstruction) in the model's normalised pixel space, both [B, T', H, W, C]
    at the predicted frames. With norm_pix_loss each predicted patch gets its true mean and
    variance back (the figure's caption says so)."""
    loss, pred, mask = model(video, noise, mask_ratio=mask_ratio)
    g = model.geometry
    target = model.target(video)  # [B, L, u*p*p*C]
    if model.norm_pix_loss:
        mean = target.mean(-1, keepdims=True)
        std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
        pred = pred * std + mean
    m = mask[..., None]
    grid = g.grid
    u, p = model.t_pred_patch, g.patch_size
    recon = layers.unpatchify(pred * m + target * (1 - m), grid, u, p, model.in_chans)
    masked = layers.unpatchify(target * (1 - m), grid, u, p, model.in_chans)
    return masked, recon, layers.unpatchify(target, grid, u, p, model.in_chans), float(loss)


def _to_uint8(x: np.ndarray, mean, std) -> np.ndarray:
    return np.clip((x * np.asarray(std) + np.asarray(mean)) * 255.0, 0, 255).astype(np.uint8)


def figure(rows: list[np.ndarray], mean, std, max_frames: int = 8, gap: int = 2) -> np.ndarray:
    """Stack rows of frames [T, H, W, C] (normalised) into one uint8 image, rows top to bottom."""
    t = min(max_frames, rows[0].shape[0])
    h, w = rows[0].shape[1:3]
    canvas = np.full((len(rows) * (h + gap) - gap, t * (w + gap) - gap, 3), 255, np.uint8)
    for r, frames in enumerate(rows):
        frames = _to_uint8(np.asarray(frames), mean, std)
        for i in range(t):
            canvas[r * (h + gap):r * (h + gap) + h, i * (w + gap):i * (w + gap) + w] = frames[i]
    return canvas


def reconstruction_figure(config, graphdef, params, source, path: str, indices=(0, 1, 2), seed: int = 0,
                          mask_ratio: float | None = None) -> np.ndarray:
    """Write a PNG with three rows per clip: original, masked input (masked patches grey) and
    reconstruction (visible patches pasted back), at the frames the decoder predicts."""
    from mae_st_jax.train.step import normalize
    model = nnx.merge(graphdef, params)
    rows = []
    for i, index in enumerate(i for i in indices if i < len(source)):
        info = source.info(index)
        idx = sampling.test_clip(0, 1, info.num_frames, config.model.num_frames, config.data.sampling_rate,
                                 info.fps, config.data.target_fps)
        frames = augment.center_crop(source.frames(index, idx), config.model.img_size)  # real videos: any size
        video = normalize(jnp.asarray(frames)[None], config.data.mean, config.data.std)
        noise = model.make_noise(jax.random.fold_in(jax.random.key(seed), i), 1)
        masked, recon, original, _ = reconstruct(model, video, noise, mask_ratio)
        rows += [np.asarray(original[0]), np.asarray(masked[0]), np.asarray(recon[0])]
    image = figure(rows, config.data.mean, config.data.std)
    scale = max(1, 384 // image.shape[1])
    Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST).save(path)
    return image
