"""Attention alone, forward + backward, on MAE-ST's shapes: which implementation to use on a GPU.

python benchmarks/attention.py --batch=32 --dtype=bfloat16
Shapes (ViT-L/16, 16x224x224, mask 0.9): the decoder's 1569 tokens x 16 heads x head_dim 32 and
the encoder's 157 tokens x 16 heads x head_dim 64. Implementations: XLA's, the model's padded cuDNN
(`layers.cudnn_attention`), and Pallas' Triton flash attention (`jax.experimental.pallas.ops.gpu.
attention.mha`; padding to its block size masked by segment ids) at a few block sizes. Each is checked
against fp32 XLA attention (values and dq/dk/dv) and timed as median milliseconds over `--iters`.
TFLOP/s counts 3x the forward's 4*B*heads*N^2*head_dim (the train-FLOP convention of train_step.py).
Imports no TensorFlow.
"""

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mae_st_jax.models import layers  # noqa: E402
from benchmarks import common  # noqa: E402


XLA = functools.partial(jax.nn.dot_product_attention, implementation="xla")


def pallas_mha(q, k, v, block_q, block_k, block_bwd, interpret=False):
    """Pallas' Triton flash attention for any N: padded to a multiple of the blocks, the padding in
    its own segment (so real tokens never attend to it), the padded rows sliced off."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention
    n = q.shape[1]
    multiple = max(block_q, block_k, block_bwd)
    pad = -n % multiple
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    segments = jnp.broadcast_to((jnp.arange(n + pad) < n).astype(jnp.int32), (q.shape[0], n + pad))
    sizes = pallas_attention.BlockSizes(block_q=block_q, block_k=block_k, block_q_dkv=block_bwd,
                                        block_kv_dkv=block_bwd, block_q_dq=block_bwd, block_kv_dq=block_bwd)
    out = pallas_attention.mha(q, k, v, segments, sm_scale=q.shape[-1] ** -0.5, block_sizes=sizes,
                               interpret=interpret)
    return out[:, :n]


def implementations(interpret: bool):
    impls = {"xla": XLA,
             "cudnn_pad16": functools.partial(layers.cudnn_attention, multiple=16),
             "cudnn_pad64": functools.partial(layers.cudnn_attention, multiple=64)}
    for bq, bk, bb in ((128, 128, 32), (128, 64, 64), (64, 64, 32), (128, 128, 64)):
        impls[f"pallas_{bq}x{bk}_bwd{bb}"] = functools.partial(pallas_mha, block_q=bq, block_k=bk, block_bwd=bb,
                                                              interpret=interpret)
    return impls


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated implementation names")
    ap.add_argument("--shapes", default="decoder:1569:16:32,encoder:157:16:64")
    ap.add_argument("--interpret", action="store_true", help="Pallas in interpret mode (CPU check)")
    a = ap.parse_args()
    dtype = jnp.dtype(a.dtype)
    impls = implementations(a.interpret)
    if a.only:
        impls = {name: impls[name] for name in a.only.split(",")}
    rows = []
    for shape in a.shapes.split(","):
        name, n, heads, hd = shape.split(":")
        n, heads, hd = int(n), int(heads), int(hd)
        keys = jax.random.split(jax.random.key(n), 4)
        q, k, v, g = (jax.random.normal(s, (a.batch, n, heads, hd), jnp.float32) for s in keys)

        def value_and_grads(fn, cast):
            loss = lambda q, k, v: jnp.sum(fn(*(t.astype(cast) for t in (q, k, v))).astype(jnp.float32) * g)
            return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))

        ref = value_and_grads(XLA, jnp.float32)(q, k, v)
        flops = 3 * 4 * a.batch * heads * n * n * hd
        for impl, fn in impls.items():
            row = {"shape": name, "n": n, "heads": heads, "head_dim": hd, "batch": a.batch, "impl": impl}
            try:
                step = value_and_grads(fn, dtype)
                got = jax.block_until_ready(step(q, k, v))
                row["rel_err"] = [float(jnp.linalg.norm(x.astype(jnp.float32) - y) / jnp.linalg.norm(y))
                                  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref))]
                # warmed up by the error check above
                row["ms"] = common.median_ms(lambda: jax.block_until_ready(step(q, k, v)), a.iters, warmup=0)
                row["tflops"] = flops / (row["ms"] / 1e3) / 1e12
            except Exception as e:  # noqa: BLE001 - report and go on to the next implementation
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"{'shape':8} {'impl':24} {'ms':>8} {'TFLOP/s':>8}  max rel err")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:8} {r['impl']:24} {r['error']}")
        else:
            print(f"{r['shape']:8} {r['impl']:24} {r['ms']:8.2f} {r['tflops']:8.1f}  {max(r['rel_err']):.1e}")


if __name__ == "__main__":
    main()
