"""MAE-ST: a ViT encoder on the visible spacetime patches and a small ViT decoder that
reconstructs the hidden ones. Parameter names mirror the PyTorch reference's state dict."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mae_st_jax import masking
from mae_st_jax.models import layers

# width, depth, heads, patch (REFERENCE.md); "tiny" is ours, for tests and the demo.
SIZES = {
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, patch_size=8),
    "s16": dict(embed_dim=384, depth=12, num_heads=6, patch_size=16),
    "b16": dict(embed_dim=768, depth=12, num_heads=12, patch_size=16),
    "l16": dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16),
    "h16": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=16),
    "h14": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}
ALIASES = {"vit_t": "tiny", "vit_s": "s16", "vit_b": "b16", "vit_l": "l16", "vit_h": "h16"}


def model_kwargs(size: str) -> dict:
    """Encoder settings of a named size ('vit_b', 'b16', ...)."""
    name = ALIASES.get(size, size)
    if name not in SIZES:
        raise ValueError(f"model size {size!r} is unknown: choose one of {sorted(SIZES) + sorted(ALIASES)}")
    return dict(SIZES[name])


def target_frame_indices(num_frames: int, pred_t_dim: int, mode: str) -> np.ndarray:
    """Frames the decoder predicts: 'linspace' (mae_st, truncated) or 'stride' (PySlowFast)."""
    if pred_t_dim > num_frames or pred_t_dim < 1:
        raise ValueError(f"pred_t_dim={pred_t_dim} must be in [1, num_frames={num_frames}]")
    if mode == "linspace":
        return np.linspace(0, num_frames - 1, pred_t_dim).astype(np.int64)
    if mode == "stride":
        if num_frames % pred_t_dim:
            raise ValueError(f"target_frames='stride' needs num_frames={num_frames} divisible by "
                             f"pred_t_dim={pred_t_dim}")
        return np.arange(0, num_frames, num_frames // pred_t_dim)[:pred_t_dim]
    raise ValueError(f"target_frames={mode!r}: choose 'linspace' or 'stride'")


def norm_pix_target(target: jax.Array) -> jax.Array:
    """Per token: (x - mean) / sqrt(unbiased var + 1e-6), as the reference."""
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    return (target - mean) / jnp.sqrt(var + 1e-6)


@dataclasses.dataclass(frozen=True)
class VideoGeometry:
    num_frames: int
    img_size: int
    patch_size: int
    t_patch_size: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.num_frames // self.t_patch_size, self.img_size // self.patch_size,
                self.img_size // self.patch_size)

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w


def token_grid(model_config) -> tuple[int, int, int] | None:
    """(T', H', W') of a model config (dict or ConfigDict), or None when it lacks the sizes."""
    keys = ("num_frames", "img_size", "patch_size", "t_patch_size")
    if not all(k in model_config for k in keys):
        return None
    return VideoGeometry(**{k: model_config[k] for k in keys}).grid


class VideoEncoder(nnx.Module):
    """Patch embedding, cls token, learned position embeddings, blocks and final norm."""

    def __init__(self, *, img_size=224, patch_size=16, num_frames=16, t_patch_size=2, in_chans=3,
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True,
                 sep_pos_embed=True, cls_embed=True, dtype="float32", param_dtype="float32",
                 remat="none", scan_layers=False, attention_impl="", rngs: nnx.Rngs):
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        if num_frames % t_patch_size:
            raise ValueError(f"num_frames={num_frames} is not divisible by t_patch_size={t_patch_size}")
        self.geometry = VideoGeometry(num_frames, img_size, patch_size, t_patch_size)
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.sep_pos_embed, self.cls_embed = sep_pos_embed, cls_embed
        self.dtype, pdt = layers.to_dtype(dtype), layers.to_dtype(param_dtype)
        self.remat, self.scan_layers = remat, scan_layers
        block_kwargs = dict(qkv_bias=qkv_bias, attention_impl=attention_impl, dtype=self.dtype, param_dtype=pdt)
        self.block_kwargs = block_kwargs
        t, h, w = self.geometry.grid
        self.patch_embed = layers.PatchEmbed(t_patch_size, patch_size, in_chans, embed_dim,
                                             dtype=self.dtype, param_dtype=pdt, rngs=rngs)
        param = lambda shape: nnx.Param(layers.normal_02(rngs.params(), shape, pdt))
        if cls_embed:
            self.cls_token = param((1, 1, embed_dim))
        if sep_pos_embed:
            self.pos_embed_spatial = param((1, h * w, embed_dim))
            self.pos_embed_temporal = param((1, t, embed_dim))
            if cls_embed:
                self.pos_embed_class = param((1, 1, embed_dim))
        else:
            self.pos_embed = param((1, t * h * w + int(cls_embed), embed_dim))
        self.blocks = layers.make_blocks(depth, embed_dim, num_heads, mlp_ratio, rngs=rngs, **block_kwargs)
        self.norm = layers.layer_norm(embed_dim, pdt, rngs)

    # --- position embeddings -------------------------------------------------------------
    def encoder_pos_embed(self) -> tuple[jax.Array, jax.Array | None]:
        """([L, E] for the patch tokens, [1, E] for the cls token or None)."""
        return _pos_tables(self, "", self.geometry.grid)

    # --- encoder ---------------------------------------------------------------------------
    def embed(self, video: jax.Array, ids_keep: jax.Array | None = None) -> jax.Array:
        """Video [B, T, H, W, C] -> tokens [B, (1 +) N, E] with pos-embeds (N = all or the kept)."""
        g = self.geometry
        patches = layers.patchify(video, g.t_patch_size, g.patch_size)  # [B, L, t*p*p*C]
        pos, cls_pos = self.encoder_pos_embed()
        pos = jnp.broadcast_to(pos[None], (video.shape[0],) + pos.shape)
        if ids_keep is not None:  # gather the visible patches first: ~1/(1-r) less embed work
            patches = jnp.take_along_axis(patches, ids_keep[..., None], axis=1)
            pos = jnp.take_along_axis(pos, ids_keep[..., None], axis=1)
        x = self.patch_embed(patches).astype(jnp.float32) + pos
        if self.cls_embed:
            cls = jnp.broadcast_to(self.cls_token[...] + cls_pos[None], (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls.astype(jnp.float32), x], axis=1)
        return x

    def encode(self, video: jax.Array, ids_keep: jax.Array | None = None, drop_scales=None) -> jax.Array:
        """Tokens after blocks and final norm, cls output included when there is one."""
        x = self.embed(video, ids_keep)
        x = layers.run_blocks(self.blocks, x, remat=self.remat, scan=self.scan_layers, drop_scales=drop_scales)
        return self.norm(x)


def _pos_tables(module, prefix: str, grid, separate: bool | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Position tables of the encoder (prefix '') or decoder (prefix 'decoder_'); `separate` (default: the
    module's sep_pos_embed) says whether they are spatial + temporal (+ class) tables or one joint table."""
    t, h, w = grid
    if module.sep_pos_embed if separate is None else separate:
        spatial = getattr(module, prefix + "pos_embed_spatial")[0]  # [H'W', E]
        temporal = getattr(module, prefix + "pos_embed_temporal")[0]  # [T', E]
        pos = (temporal[:, None, :] + spatial[None, :, :]).reshape(t * h * w, -1)  # token t*H'W' + s
        cls_pos = getattr(module, prefix + "pos_embed_class")[0] if module.cls_embed else None
        return pos, cls_pos
    table = getattr(module, prefix + "pos_embed")[0]
    if module.cls_embed:
        return table[1:], table[:1]
    return table, None


DECODER_CLS = ("token", "encoder")
DECODER_POS_TABLES = ("same", "separate", "joint")


def decoder_table_separate(decoder_pos_table: str, sep_pos_embed: bool) -> bool:
    """Whether a decoder_pos_table ('same' follows the encoder's sep_pos_embed) is spatial + temporal tables."""
    return sep_pos_embed if decoder_pos_table == "same" else decoder_pos_table == "separate"


class MaskedAutoencoder(VideoEncoder):
    """MAE-ST. Call with a video [B, T, H, W, C] and either `noise` [B, L] or `key`;
    returns (loss, pred [B, L, u*p*p*C], mask [B, L] with 1 = removed).

    The decoder's class token (with cls_embed) is its own zero-initialised parameter (decoder_cls='token',
    mae_st), or the encoder's class-token output through decoder_embed ('encoder', PySlowFast's MaskMViT).
    Its position table is laid out as the encoder's (decoder_pos_table='same', mae_st), or 'separate'
    (spatial + temporal + class) or 'joint' ([1, L+1, D], PySlowFast's default) whatever the encoder's."""

    def __init__(self, *, decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16,
                 pred_t_dim=8, target_frames="linspace", norm_pix_loss=True, mask_ratio=0.9,
                 mask_strategy="random", mask_block_size=(2, 2, 2), decoder_cls="token", decoder_pos_table="same",
                 rngs: nnx.Rngs, **encoder_kwargs):
        super().__init__(rngs=rngs, **encoder_kwargs)
        if decoder_cls not in DECODER_CLS:
            raise ValueError(f"decoder_cls={decoder_cls!r}: choose one of {DECODER_CLS}")
        if decoder_pos_table not in DECODER_POS_TABLES:
            raise ValueError(f"decoder_pos_table={decoder_pos_table!r}: choose one of {DECODER_POS_TABLES}")
        self.decoder_cls = decoder_cls
        self.decoder_sep_pos_embed = decoder_table_separate(decoder_pos_table, self.sep_pos_embed)
        g = self.geometry
        if g.num_frames % pred_t_dim or (g.t_patch_size * pred_t_dim) % g.num_frames:
            raise ValueError(f"pred_t_dim={pred_t_dim} must divide num_frames={g.num_frames} and "
                             f"t_patch_size*pred_t_dim must be a multiple of num_frames")
        self.pred_t_dim = pred_t_dim
        self.t_pred_patch = g.t_patch_size * pred_t_dim // g.num_frames  # u
        self.target_frames = tuple(int(i) for i in target_frame_indices(g.num_frames, pred_t_dim, target_frames))
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio, self.mask_strategy = mask_ratio, mask_strategy
        self.mask_block_size = tuple(mask_block_size)
        masking.num_visible(mask_strategy, g.grid, mask_ratio)  # validates
        pdt = layers.to_dtype(encoder_kwargs.get("param_dtype", "float32"))
        d = decoder_embed_dim
        t, h, w = g.grid
        param = lambda shape: nnx.Param(layers.normal_02(rngs.params(), shape, pdt))
        self.decoder_embed = nnx.Linear(self.embed_dim, d, kernel_init=layers.xavier, bias_init=layers.zeros,
                                        dtype=self.dtype, param_dtype=pdt, rngs=rngs)
        self.mask_token = param((1, 1, d))
        if self.cls_embed and decoder_cls == "token":
            self.decoder_cls_token = nnx.Param(jnp.zeros((1, 1, d), pdt))
        if self.decoder_sep_pos_embed:
            self.decoder_pos_embed_spatial = param((1, h * w, d))
            self.decoder_pos_embed_temporal = param((1, t, d))
            if self.cls_embed:
                self.decoder_pos_embed_class = param((1, 1, d))
        else:
            self.decoder_pos_embed = param((1, t * h * w + int(self.cls_embed), d))
        mlp_ratio = encoder_kwargs.get("mlp_ratio", 4.0)
        self.decoder_blocks = layers.make_blocks(decoder_depth, d, decoder_num_heads, mlp_ratio,
                                                 rngs=rngs, **self.block_kwargs)
        self.decoder_norm = layers.layer_norm(d, pdt, rngs)
        out = self.t_pred_patch * g.patch_size ** 2 * self.in_chans
        self.decoder_pred = nnx.Linear(d, out, kernel_init=layers.xavier, bias_init=layers.zeros,
                                       dtype=self.dtype, param_dtype=pdt, rngs=rngs)

    def num_visible(self, mask_ratio: float | None = None) -> int:
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        return masking.num_visible(self.mask_strategy, self.geometry.grid, ratio)

    def make_noise(self, key: jax.Array, batch: int) -> jax.Array:
        return masking.make_noise(key, self.mask_strategy, batch, self.geometry.grid, self.mask_block_size)

    def decode(self, latent: jax.Array, ids_restore: jax.Array, cls_latent: jax.Array | None = None) -> jax.Array:
        """Visible latents [B, K, E] (no cls) -> predictions [B, L, u*p*p*C]. `cls_latent` [B, 1, E]: the
        encoder's class-token output, which decoder_cls='encoder' needs."""
        b = latent.shape[0]
        length = self.geometry.num_patches
        x = self.decoder_embed(latent).astype(jnp.float32)  # [B, K, D]
        mask_tokens = jnp.broadcast_to(self.mask_token[...].astype(jnp.float32),
                                       (b, length - x.shape[1], x.shape[-1]))
        x = jnp.concatenate([x, mask_tokens], axis=1)
        x = jnp.take_along_axis(x, ids_restore[..., None], axis=1)  # unshuffle: [B, L, D]
        pos, cls_pos = _pos_tables(self, "decoder_", self.geometry.grid, self.decoder_sep_pos_embed)
        x = x + pos[None]
        if self.cls_embed:
            if self.decoder_cls == "encoder":
                if cls_latent is None:
                    raise ValueError("decoder_cls='encoder' decodes the encoder's class-token output: pass cls_latent")
                cls = self.decoder_embed(cls_latent).astype(jnp.float32) + cls_pos[None]
            else:
                cls = jnp.broadcast_to(self.decoder_cls_token[...] + cls_pos[None], (b, 1, x.shape[-1]))
            x = jnp.concatenate([cls.astype(jnp.float32), x], axis=1)
        x = layers.run_blocks(self.decoder_blocks, x, remat=self.remat, scan=self.scan_layers)
        x = self.decoder_pred(self.decoder_norm(x)).astype(jnp.float32)
        return x[:, 1:] if self.cls_embed else x

    def target(self, video: jax.Array) -> jax.Array:
        """The (un-normalised) per-token pixel target [B, L, u*p*p*C] from the subsampled frames."""
        frames = video[:, np.asarray(self.target_frames)].astype(jnp.float32)
        return layers.patchify(frames, self.t_pred_patch, self.geometry.patch_size)

    def loss(self, video: jax.Array, pred: jax.Array, mask: jax.Array) -> jax.Array:
        target = self.target(video)
        if self.norm_pix_loss:
            target = norm_pix_target(target)
        per_token = jnp.mean((pred - target) ** 2, axis=-1)
        return jnp.sum(per_token * mask) / jnp.sum(mask)

    def __call__(self, video: jax.Array, noise: jax.Array | None = None, *, key: jax.Array | None = None,
                 mask_ratio: float | None = None):
        if noise is None:
            if key is None:
                raise ValueError("MaskedAutoencoder needs `noise` [B, L] or a `key`")
            noise = self.make_noise(key, video.shape[0])
        ids_keep, ids_restore, mask = masking.masking_from_noise(noise, self.num_visible(mask_ratio))
        latent, cls_latent = self.encode(video, ids_keep), None
        if self.cls_embed:
            latent, cls_latent = latent[:, 1:], latent[:, :1]
        pred = self.decode(latent, ids_restore, cls_latent)
        return self.loss(video, pred, mask), pred, mask
