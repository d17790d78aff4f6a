"""Fine-tuning classifier: the MAE-ST encoder on all tokens, mean-pooled, normed, dropout, linear head."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_st_jax.models import layers
from mae_st_jax.models.mae import VideoEncoder


class VideoClassifier(VideoEncoder):
    """ViT video classifier (mae_st `models_vit.VisionTransformer`). Call with a video
    [B, T, H, W, C]; returns fp32 logits [B, num_classes]."""

    def __init__(self, num_classes: int, drop_path_rate: float = 0.0, dropout_rate: float = 0.0,
                 head_init_std: float = 2e-5, *, rngs: nnx.Rngs, **encoder_kwargs):
        super().__init__(rngs=rngs, **encoder_kwargs)
        if not 0.0 <= drop_path_rate < 1.0 or not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"drop_path_rate={drop_path_rate} and dropout_rate={dropout_rate} must be in [0, 1)")
        self.num_classes = num_classes
        self.dropout_rate = float(dropout_rate)
        depth = len(self.blocks)
        # stochastic-depth rate of block i: linear from 0 to drop_path_rate over depth
        self.drop_path_rates = tuple(float(r) for r in np.linspace(0.0, drop_path_rate, depth))
        pdt = layers.to_dtype(encoder_kwargs.get("param_dtype", "float32"))
        # bias: PyTorch's nn.Linear default U(-1/sqrt(E), 1/sqrt(E)), which mae_st leaves as it is (it
        # re-initialises only head.weight)
        bound = 1.0 / math.sqrt(self.embed_dim)
        bias_init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
        self.head = nnx.Linear(self.embed_dim, num_classes,
                               kernel_init=nnx.initializers.normal(head_init_std), bias_init=bias_init,
                               dtype=jnp.float32, param_dtype=pdt, rngs=rngs)

    def drop_scales(self, key: jax.Array, batch: int) -> jax.Array:
        """[depth, B, 2] per-sample residual multipliers: Bernoulli(keep) / keep, as timm's DropPath."""
        keep = 1.0 - jnp.asarray(self.drop_path_rates, jnp.float32)[:, None, None]  # [depth, 1, 1]
        shape = (len(self.drop_path_rates), batch, 2)  # one draw per block, sample and branch
        return jax.random.bernoulli(key, keep, shape).astype(jnp.float32) / keep

    def pool(self, video: jax.Array, drop_scales: jax.Array | None = None) -> jax.Array:
        """Blocks over all tokens, mean over the patch tokens (not the cls output), final norm: [B, E]."""
        x = self.embed(video)
        x = layers.run_blocks(self.blocks, x, remat=self.remat, scan=self.scan_layers, drop_scales=drop_scales)
        if self.cls_embed:
            x = x[:, 1:]
        return self.norm(x.astype(jnp.float32).mean(axis=1))

    def features(self, video: jax.Array) -> jax.Array:
        """Pooled, normed features [B, E] (no stochastic depth, no dropout, no head)."""
        return self.pool(video)

    def __call__(self, video: jax.Array, *, key: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        stochastic = not deterministic and (any(self.drop_path_rates) or self.dropout_rate > 0)
        if stochastic and key is None:
            raise ValueError("VideoClassifier needs a `key` when deterministic=False")
        drop_scales = None
        if stochastic:
            key_path, key_dropout = jax.random.split(key)
            if any(self.drop_path_rates):
                drop_scales = self.drop_scales(key_path, video.shape[0])
        x = self.pool(video, drop_scales)
        if stochastic and self.dropout_rate > 0:
            keep = 1.0 - self.dropout_rate
            x = x * jax.random.bernoulli(key_dropout, keep, x.shape).astype(x.dtype) / keep
        return self.head(x).astype(jnp.float32)
