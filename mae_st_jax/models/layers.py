"""ViT building blocks for video: 3D patch embedding, pre-norm blocks, block runner, patchify."""

import functools
import math
import os

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
        # bias: PyTorch's Conv3d default U(-1/sqrt(fan_in), 1/sqrt(fan_in)), which the reference keeps (it
        # re-initialises only the conv's weight, and its _init_weights touches Linear and LayerNorm only)
        bound = 1.0 / math.sqrt(in_chans * t_patch * patch * patch)
        bias_init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
        self.proj = nnx.Conv(in_chans, dim, kernel_size=(t_patch, patch, patch),
                             strides=(t_patch, patch, patch), padding="VALID",
                             kernel_init=kernel_init, bias_init=bias_init,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, patch_vectors: jax.Array) -> jax.Array:
        """[B, N, t*p*p*C] (from `patchify`) -> [B, N, dim]."""
        kernel = self.proj.kernel[...]
        kernel = kernel.reshape(-1, kernel.shape[-1]).astype(self.dtype)  # [t*p*p*C, dim]
        out = jnp.einsum("bnk,kd->bnd", patch_vectors.astype(self.dtype), kernel)
        return out + self.proj.bias[...].astype(self.dtype)


def l2_cache_bytes(path: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """Per-core L2 cache size from Linux sysfs ('2048K'), or None where it cannot be read."""
    try:
        for index in sorted(os.listdir(path)):
            with open(os.path.join(path, index, "level")) as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(path, index, "size")) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        return None
    return None


def chunk_elements_for(l2_bytes: int | None) -> int:
    """Score elements [c, N, N] per loop step of `softmax_attention`: as many as the L2 cache has
    bytes (the fp32 scores then take 4x L2), 2^19 where the size is unknown, at most 2^22.
    Measured on MAE-ST's ViT-B decoder attention (64 (sample, head) pairs of 393 x 393, fwd + bwd)
    on a 2-core Xeon with 2 MiB L2: 2^21 (8 pairs per step) 50 ms, 2^20 57 ms, 2^19 (2 pairs)
    63 ms, all 64 pairs at once 90 ms. 2^19 was the size chosen on the 2-core AMD EPYC of earlier
    sessions (its L2 size was not recorded)."""
    if not l2_bytes:
        return 1 << 19
    return int(min(max(l2_bytes, 1 << 17), 1 << 22))


ATTENTION_CHUNK_ELEMENTS = chunk_elements_for(l2_cache_bytes())


def _attention_chunk(groups: int, n: int) -> int:
    """Largest divisor of `groups` (batch * heads) whose [c, n, n] scores fit ATTENTION_CHUNK_ELEMENTS."""
    target = max(1, ATTENTION_CHUNK_ELEMENTS // (n * n))
    return max(c for c in range(1, min(groups, target) + 1) if groups % c == 0)


def _to_chunks(x: jax.Array, c: int) -> jax.Array:
    """[B, N, heads, hd] -> [B * heads / c, c, N, hd] (chunks of c (sample, head) pairs)."""
    b, n, h, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * h // c, c, n, d)


def _from_chunks(x: jax.Array, shape) -> jax.Array:
    b, n, h, d = shape
    return x.reshape(b, h, n, d).transpose(0, 2, 1, 3)


def _scores(q, k, scale):
    """(q * scale, exp-able logits [c, N, N] in fp32)."""
    qs = q * jnp.asarray(scale, q.dtype)
    return qs, jnp.einsum("cqd,ckd->cqk", qs, k, preferred_element_type=jnp.float32)


def _attention_chunk_fwd(q, k, v, scale):
    """One chunk [c, N, hd]: (out, row max, 1 / row sum of exp). The softmax normalisation is
    applied to the [N, hd] output rather than to the [N, N] probabilities."""
    _, logits = _scores(q, k, scale)
    row_max = jnp.max(logits, axis=-1)
    e = jnp.exp(logits - row_max[..., None])
    inv_sum = 1.0 / jnp.sum(e, axis=-1)
    out = jnp.einsum("cqk,ckd->cqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out * inv_sum[..., None]).astype(q.dtype), row_max, inv_sum


def _attention_chunk_bwd(q, k, v, row_max, inv_sum, delta, g, scale):
    # P = exp(S - max) / sum (rows); out = P v; dP = g v^T; dS = P * (dP - rowsum(P * dP)) with
    # rowsum(P * dP) = g . out. With e = exp(S - max) and g' = g / sum per query row:
    # dS = e * (g' v^T - delta), delta = g' . out, dv = e^T g', dq = dS k * scale,
    # dk = dS^T (q * scale).
    qs, logits = _scores(q, k, scale)  # recomputed: cheaper than keeping [N, N] per chunk
    e = jnp.exp(logits - row_max[..., None])
    g_scaled = g.astype(jnp.float32) * inv_sum[..., None]
    dv = jnp.einsum("cqk,cqd->ckd", e.astype(v.dtype), g_scaled.astype(v.dtype),
                    preferred_element_type=jnp.float32)
    dp = jnp.einsum("cqd,ckd->cqk", g_scaled.astype(v.dtype), v, preferred_element_type=jnp.float32)
    ds = (e * (dp - delta[..., None])).astype(q.dtype)
    dq = jnp.einsum("cqk,ckd->cqd", ds, k, preferred_element_type=jnp.float32) * scale
    dk = jnp.einsum("cqk,cqd->ckd", ds, qs, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def softmax_attention(q, k, v, scale):
    """softmax(q k^T * scale) v for q, k, v [B, N, heads, hd], fp32 softmax, the same function as
    the written-out attention: computed in chunks of (sample, head) pairs whose [N, N] scores stay
    in cache, with a hand-written backward that recomputes the scores per chunk (flash-attention
    style) instead of storing them. XLA:CPU runs the autodiff'd version as many memory-bound
    passes over [B, heads, N, N]; this is several times faster there."""
    return _softmax_attention_fwd(q, k, v, scale)[0]


def _softmax_attention_fwd(q, k, v, scale):
    b, n, h, _ = q.shape
    c = _attention_chunk(b * h, n)
    qc, kc, vc = (_to_chunks(x, c) for x in (q, k, v))
    out, row_max, inv_sum = jax.lax.map(lambda a: _attention_chunk_fwd(*a, scale), (qc, kc, vc))
    return _from_chunks(out, q.shape), (qc, kc, vc, row_max, inv_sum, out)


def _softmax_attention_bwd(scale, res, g):
    qc, kc, vc, row_max, inv_sum, out = res
    gc = _to_chunks(g, qc.shape[1])
    # delta (one number per query row) for all chunks before the loop: computed inside it, XLA:CPU
    # put its row reduction into the YNNPACK fusion of the [c, N, N] dS product (decoder attention
    # fwd + bwd 63 -> 55 ms with it outside, on the 2-core Zen 4, medians of 41 interleaved runs
    # each; the whole ViT-B step ~5% faster).
    delta = jnp.einsum("mcqd,mcqd->mcq", gc.astype(jnp.float32), out.astype(jnp.float32)) * inv_sum
    grads = jax.lax.map(lambda a: _attention_chunk_bwd(*a, scale), (qc, kc, vc, row_max, inv_sum, delta, gc))
    return tuple(_from_chunks(x, g.shape) for x in grads)


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, multiple: int = 16,
                    implementation: str = "cudnn") -> jax.Array:
    """cuDNN's fused (flash) attention for q, k, v [B, N, heads, hd] with any N: the sequence is
    padded to a multiple of `multiple` and the padding masked out by sequence lengths (cuDNN
    rejects odd lengths in training, and MAE-ST's are 1 + visible tokens, e.g. 157 and 1569).
    Padded query rows are sliced off, so they get no gradient. On one H100 (ViT-L/16 MAE-ST
    step, batch 32) this made the step 2.3x faster than XLA's attention, which materialises the
    decoder's [B, 16, 1569, 1569] scores; padding to 16 or 64 timed the same. `implementation`
    exists for tests of the padding on CPU ('xla')."""
    n = q.shape[1]
    pad = -n % multiple
    if not pad:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    lengths = jnp.full((q.shape[0],), n, jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :n]


def _on_cuda() -> bool:
    return jax.default_backend() == "gpu" and "nvidia" in jax.devices()[0].device_kind.lower()


class Attention(nnx.Module):
    """Multi-head self-attention with separate q, k, v projections (the reference's layout).

    attention_impl: '' picks `softmax_attention` on CPU, `cudnn_attention` on NVIDIA GPUs with
    bf16/fp16 inputs (falling back to XLA's where cuDNN refuses the shape) and
    jax.nn.dot_product_attention's own choice elsewhere; 'xla' / 'cudnn' force that
    implementation; 'reference' is the plain written-out softmax (autodiff'd), kept as the
    numerical reference.
    """

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
        elif self.attention_impl is None and jax.default_backend() == "cpu":
            out = softmax_attention(q, k, v, (d // self.num_heads) ** -0.5)  # see its docstring
        elif self.attention_impl == "cudnn":
            out = cudnn_attention(q, k, v)
        elif self.attention_impl is None and q.dtype in (jnp.bfloat16, jnp.float16) and _on_cuda():
            try:  # raised while tracing, where cuDNN's checks reject the shape or version
                out = cudnn_attention(q, k, v)
            except (NotImplementedError, RuntimeError):
                out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
        else:
            out = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
        return self.proj(out.reshape(b, n, d))


def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU written as x * (1 + erf(x / sqrt 2)) / 2, PyTorch's nn.GELU() formula.
    jax.nn.gelu(approximate=False) computes the same function through erfc, which XLA:CPU
    evaluates about twice as slowly."""
    return x * 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, rngs):
        self.fc1 = nnx.Linear(dim, hidden, kernel_init=xavier, bias_init=zeros,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, kernel_init=xavier, bias_init=zeros,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(gelu_exact(self.fc1(x)))


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


def make_blocks(depth: int, dim: int, num_heads: int, mlp_ratio: float, *, rngs, **kwargs) -> nnx.List:
    """`depth` blocks, each with its own parameters (tree paths blocks/0/..., blocks/1/..., the
    reference's blocks.0..., blocks.1...). Kept separate rather than stacked on a [depth] axis:
    slicing a layer out of stacked arrays copies its weights every step and the gradients are
    concatenated back, which made the ViT-B CPU train step 4-11% slower. `run_blocks(scan=True)`
    stacks them inside the step instead."""
    return nnx.List([Block(dim, num_heads, mlp_ratio, rngs=rngs, **kwargs) for _ in range(depth)])


def run_blocks(blocks, x: jax.Array, *, remat: str = "none", scan: bool = False,
               drop_scales: jax.Array | None = None) -> jax.Array:
    """Apply the blocks in order, optionally rematerialised (REMAT_POLICIES).

    scan: one lax.scan over the blocks' parameters stacked on a leading axis (one compiled block
    body however deep the model: shorter compiles for deep models, at the cost of stacking the
    parameters and unstacking their gradients in every step). drop_scales: optional [depth, B, 2]
    stochastic-depth multipliers.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: choose one of {sorted(REMAT_POLICIES)}")
    blocks = list(blocks)
    graphdef = nnx.graphdef(blocks[0])

    def body(h, layer):
        layer_params, scale = layer
        return nnx.merge(graphdef, layer_params)(h, scale), None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    per_layer = [nnx.state(b) for b in blocks]
    if scan:
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)
        x, _ = jax.lax.scan(body, x, (stacked, drop_scales))
        return x
    for i, layer_params in enumerate(per_layer):
        x, _ = body(x, (layer_params, None if drop_scales is None else drop_scales[i]))
    return x
