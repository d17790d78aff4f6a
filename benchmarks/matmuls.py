"""The train step's linear-layer matmuls timed alone: XLA's, and PyTorch's with --torch.

python benchmarks/matmuls.py --size=vit_b --frames=16 --img=112 --batch=4 --torch --threads=2

On CPU both sides spend most of a step in these matmuls, so how fast each library runs them on a
given machine decides most of the ratio between our step and the PyTorch reference's
(benchmarks/compare_torch.py). For every distinct [rows, in] x [in, out] product of the model
(patch embed, q/k/v/proj and MLP of each encoder and decoder block, decoder embed, prediction head)
it times the forward x @ w, the input gradient g @ w^T and the weight gradient x^T @ g (median
milliseconds of --iters calls after one warm-up), and sums count x time over the step. Attention's
own matmuls are not included. PyTorch is optional (imported only with --torch). Imports no TensorFlow.
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import jax  # noqa: E402

from benchmarks import common  # noqa: E402
from mae_st_jax.models.mae import token_grid  # noqa: E402

PRODUCTS = ("forward", "input_grad", "weight_grad")


def step_shapes(m, num_visible: int) -> list[dict]:
    """The step's linear layers as {name, rows, k, n, count}: rows x k times k x n, count per step,
    for batch-1 rows (multiply rows by the batch)."""
    t, p = m.t_patch_size, m.patch_size
    grid = math.prod(token_grid(m))
    cls = int(m.cls_embed)
    e, d = m.embed_dim, m.decoder_embed_dim
    he, hd = int(e * m.mlp_ratio), int(d * m.mlp_ratio)
    u = t * m.pred_t_dim // m.num_frames
    enc, dec = num_visible + cls, grid + cls
    return [
        dict(name="patch_embed", rows=num_visible, k=t * p * p * 3, n=e, count=1),
        dict(name="encoder q/k/v/proj", rows=enc, k=e, n=e, count=4 * m.depth),
        dict(name="encoder fc1", rows=enc, k=e, n=he, count=m.depth),
        dict(name="encoder fc2", rows=enc, k=he, n=e, count=m.depth),
        dict(name="decoder_embed", rows=num_visible, k=e, n=d, count=1),
        dict(name="decoder q/k/v/proj", rows=dec, k=d, n=d, count=4 * m.decoder_depth),
        dict(name="decoder fc1", rows=dec, k=d, n=hd, count=m.decoder_depth),
        dict(name="decoder fc2", rows=dec, k=hd, n=d, count=m.decoder_depth),
        dict(name="decoder_pred", rows=dec, k=d, n=u * p * p * 3, count=1),
    ]


def time_jax(m_rows: int, k: int, n: int, dtype: str, iters: int) -> list[float]:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (m_rows, k), dtype)
    w = jax.random.normal(keys[1], (k, n), dtype)
    g = jax.random.normal(keys[2], (m_rows, n), dtype)
    fns = (jax.jit(lambda x, w: x @ w), jax.jit(lambda g, w: g @ w.T), jax.jit(lambda x, g: x.T @ g))
    args = ((x, w), (g, w), (x, g))
    return [common.median_ms(lambda f=f, a=a: f(*a).block_until_ready(), iters) for f, a in zip(fns, args)]


def time_torch(m_rows: int, k: int, n: int, iters: int) -> list[float]:
    import torch
    x, w, g = torch.randn(m_rows, k), torch.randn(k, n), torch.randn(m_rows, n)
    fns = (lambda: x @ w, lambda: g @ w.T, lambda: x.T @ g)
    return [common.median_ms(f, iters) for f in fns]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_clip_args(ap)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--torch", action="store_true", help="also time PyTorch (CPU, fp32)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    a = ap.parse_args()
    c = common.make_config(a.size, a.frames, a.img, a.batch, a.mask_ratio, a.dtype)
    common.apply_overrides(c, a.set)
    m = c.model
    visible = common.num_visible(m)
    if a.torch:
        import torch
        if a.threads > 0:
            torch.set_num_threads(a.threads)
    rows, totals = [], {"jax": 0.0, "torch": 0.0 if a.torch else None}
    for s in step_shapes(m, visible):
        s = dict(s, rows=s["rows"] * a.batch)
        s["jax_ms"] = dict(zip(PRODUCTS, time_jax(s["rows"], s["k"], s["n"], a.dtype, a.iters)))
        totals["jax"] += s["count"] * sum(s["jax_ms"].values())
        if a.torch:
            s["torch_ms"] = dict(zip(PRODUCTS, time_torch(s["rows"], s["k"], s["n"], a.iters)))
            totals["torch"] += s["count"] * sum(s["torch_ms"].values())
        s["gflop_per_s_forward"] = 2 * s["rows"] * s["k"] * s["n"] / s["jax_ms"]["forward"] / 1e6
        rows.append(s)
        line = f"{s['name']:20s} [{s['rows']}, {s['k']}] x [{s['k']}, {s['n']}] x{s['count']}: jax " + \
            " / ".join(f"{v:.2f}" for v in s["jax_ms"].values())
        if a.torch:
            line += "  torch " + " / ".join(f"{v:.2f}" for v in s["torch_ms"].values())
        print(line + " ms", file=sys.stderr, flush=True)
    result = {"device": jax.devices()[0].device_kind, "host_cpu": common.cpu_description(), **vars(a),
              "visible_tokens": visible, "shapes": rows, "step_total_ms": totals}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
