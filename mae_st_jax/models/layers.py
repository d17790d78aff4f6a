"""ViT building blocks for video: 3D patch embedding, pre-norm blocks, stacked-block runner, patchify."""

import jax
import jax.numpy as jnp
from flax import nnx

xavier = nnx.initializers.xavier_uniform()
zeros = nnx.initializers.zeros_init()
normal_02 = nnx.initializers.normal(0.02)

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def to_dtype(name) -> jnp.dtype:
    return jnp.dtype(name)


def patchify(video: jax.Array, t: int, p: int) -> jax.Array:
    """[B, T, H, W, C] -> [B, L, t*p*p*C]; tokens time-major, vector ordered (t, row, col, C)."""
    b, tt, hh, ww, c = video.shape
    x = video.reshape(b, tt // t, t, hh // p, p, ww // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)  # [B, T', H', W', t, p, p, C]
    return x.reshape(b, (tt // t) * (hh // p) * (ww // p), t * p * p * c)


def unpatchify(tokens: jax.Array, grid: tuple[int, int, int], t: int, p: int, c: int = 3) -> jax.Array:
    """Inverse of `patchify`: [B, L, t*p*p*C] -> [B, T'*t, H'*p, W'*p, C]."""
    gt, gh, gw = grid
    b = tokens.shape[0]
    x = tokens.reshape(b, gt, gh, gw, t, p, p, c)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)  # [B, T', t, H', p, W', p, C]
    return x.reshape(b, gt * t, gh * p, gw * p, c)


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = (t, p, p), applied as a matmul to patch vectors."""

    def __init__(self, t_patch: int, patch: int, in_chans: int, dim: int, *, dtype, param_dtype, rngs):
        kernel_init = nnx.initializers.xavier_uniform(in_axis=(0, 1, 2, 3), out_axis=4)
        self.proj = nnx.Conv(in_chans, dim, kernel_size=(t_patch, patch, patch),
                             strides=(t_patch, patch, patch), padding="VALID",
                             kernel_init=kernel_init, bias_init=zeros,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, patch_vectors: jax.Array) -> jax.Array:
        """[B, N, t*p*p*C] (from `patchify`) -> [B, N, dim]."""
        kernel = self.proj.kernel[...]
        kernel = kernel.reshape(-1, kernel.shape[-1]).astype(self.dtype)  # [t*p*p*C, dim]
        out = jnp.einsum("bnk,kd->bnd", patch_vectors.astype(self.dtype), kernel)
        return out + self.proj.bias[...].astype(self.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q, k, v projections (the reference's layout)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, attention_impl, dtype, param_dtype, rngs):
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        lin = lambda bias: nnx.Linear(dim, dim, use_bias=bias, kernel_init=xavier, bias_init=zeros,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q, self.k, self.v = lin(qkv_bias), lin(qkv_bias), lin(qkv_bias)
        self.proj = lin(True)
        self.num_heads = num_heads
        self.attention_impl = attention_impl or None

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        split = lambda y: y.reshape(b, n, self.num_heads, d // self.num_heads)  # [B, N, heads, hd]
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.attention_impl == "reference":  # fp32 softmax, written out
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (d // self.num_heads) ** -0.5
            weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs):
        self.fc1 = nnx.Linear(dim, hidden, kernel_init=xavier, bias_init=zeros,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, kernel_init=xavier, bias_init=zeros,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # exact (erf) GELU


def layer_norm(dim: int, param_dtype, rngs) -> nnx.LayerNorm:
    """LayerNorm eps 1e-6, computed in fp32."""
    return nnx.LayerNorm(dim, epsilon=1e-6, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)). Residual stream fp32."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool,
                 attention_impl, dtype, param_dtype, rngs):
        self.norm1 = layer_norm(dim, param_dtype, rngs)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attention_impl=attention_impl,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, param_dtype, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, drop_scale: jax.Array | None = None) -> jax.Array:
        """drop_scale [B, 2] (stochastic depth, fine-tuning only) multiplies each residual branch."""
        y = self.attn(self.norm1(x)).astype(jnp.float32)
        if drop_scale is not None:
            y = y * drop_scale[:, 0, None, None]
        x = x.astype(jnp.float32) + y
        y = self.mlp(self.norm2(x)).astype(jnp.float32)
        if drop_scale is not None:
            y = y * drop_scale[:, 1, None, None]
        return x + y


def make_blocks(depth: int, dim: int, num_heads: int, mlp_ratio: float, *, rngs, **kwargs) -> Block:
    """`depth` blocks as one Block whose parameters carry a leading [depth] axis."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
        return Block(dim, num_heads, mlp_ratio, rngs=r, **kwargs)

    return create(rngs)


def run_blocks(blocks: Block, x: jax.Array, *, remat: str = "none", scan: bool = False,
               drop_scales: jax.Array | None = None) -> jax.Array:
    """Apply stacked blocks in order with lax.scan (unrolled unless `scan`), optional remat.

    drop_scales: optional [depth, B, 2] stochastic-depth multipliers.
    """
    graphdef, params = nnx.split(blocks)
    depth = jax.tree.leaves(params)[0].shape[0]

    def body(h, layer):
        layer_params, scale = layer
        return nnx.merge(graphdef, layer_params)(h, scale), None

    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: choose one of {sorted(REMAT_POLICIES)}")
    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    x, _ = jax.lax.scan(body, x, (params, drop_scales), unroll=1 if scan else depth)
    return x
