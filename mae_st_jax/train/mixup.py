"""Mixup / CutMix and label smoothing on device, as pure functions of a key (timm's batch mode)."""

import jax
import jax.numpy as jnp


def smooth_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """int [B] -> float32 [B, K]: off = eps / K, on = 1 - eps + off."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def cutmix_box(lam, cy, cx, height: int, width: int):
    """Box of side sqrt(1 - lam) * (H, W) centred at (cy, cx), clipped to the image.

    Returns (box int32 [4] = (y0, y1, x0, x1), lam corrected to 1 - box area / (H * W)).
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = (height * ratio).astype(jnp.int32)  # int() truncation, as timm
    cut_w = (width * ratio).astype(jnp.int32)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    area = (y1 - y0) * (x1 - x0)
    return jnp.stack([y0, y1, x0, x1]).astype(jnp.int32), 1.0 - area / (height * width)


def sample_mix(key: jax.Array, height: int, width: int, *, mixup_alpha: float, cutmix_alpha: float,
               prob: float, switch_prob: float):
    """One draw per batch: (lam, use_cutmix, box). No mixing (prob miss, both alphas 0): lam = 1.

    Key use: k_apply, k_switch, k_mixup, k_cutmix, k_y, k_x = split(key, 6); lam ~ Beta(alpha, alpha)
    of the chosen method; the box centre (cy, cx) ~ randint([0, H)) x randint([0, W)).
    """
    k_apply, k_switch, k_mixup, k_cutmix, k_y, k_x = jax.random.split(key, 6)
    apply = jax.random.uniform(k_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    use_cutmix = use_cutmix & apply & jnp.asarray(mixup_alpha > 0 or cutmix_alpha > 0)
    lam_mixup = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1)
    lam_cutmix = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    box, lam_box = cutmix_box(lam_cutmix, cy, cx, height, width)
    lam = jnp.where(use_cutmix, lam_box, jnp.where(apply, lam_mixup, 1.0)).astype(jnp.float32)
    box = jnp.where(use_cutmix, box, jnp.zeros_like(box))
    return lam, use_cutmix, box


def apply_mix(video: jax.Array, targets: jax.Array, lam, use_cutmix, box):
    """Mix each sample with its partner in the reversed batch.

    video [B, T, H, W, C]: mixup lam * x + (1 - lam) * x[::-1]; cutmix pastes the partner's box
    (the same box on every frame). targets [B, K]: lam * y + (1 - lam) * y[::-1].
    """
    h, w = video.shape[2], video.shape[3]
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    in_box = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])  # [H, W]
    weight = jnp.where(use_cutmix, 1.0 - in_box.astype(jnp.float32), lam)  # own sample's share per pixel
    weight = weight[None, None, :, :, None].astype(video.dtype)  # [1, 1, H, W, 1]
    mixed = weight * video + (1 - weight) * video[::-1]
    return mixed, lam * targets + (1.0 - lam) * targets[::-1]


def mix_batch(key: jax.Array, video: jax.Array, labels: jax.Array, num_classes: int, *, mixup_alpha: float = 0.8,
              cutmix_alpha: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
              label_smoothing: float = 0.1):
    """(mixed video, soft targets [B, K], lam, box (y0, y1, x0, x1); all zeros unless cutmix)."""
    lam, use_cutmix, box = sample_mix(key, video.shape[2], video.shape[3], mixup_alpha=mixup_alpha,
                                      cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob)
    targets = smooth_targets(labels, num_classes, label_smoothing)
    mixed, targets = apply_mix(video, targets, lam, use_cutmix, box)
    return mixed, targets, lam, box


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """mean_b sum_k -targets * log_softmax(logits), in fp32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(-targets * logp, axis=-1))
