"""Step time with the encoder on all tokens vs on the visible 10%, beside the FLOP ratio.

python benchmarks/masking_speedup.py --size=vit_b --frames=16 --img=112 --batch=4
"All tokens" masks a single token (the loss needs at least one masked token), which is the
reference's encoder cost at mask ratio 0 up to one token in L. No TensorFlow imported.
"""

import argparse
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from mae_st_jax import masking  # noqa: E402
from benchmarks import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    common.add_clip_args(ap)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    out = {"device": jax.devices()[0].device_kind, **vars(a)}
    for name, ratio in (("masked", a.mask_ratio), ("all_tokens", 1e-9)):
        c = common.make_config(a.size, a.frames, a.img, a.batch, ratio, a.dtype)
        m = c.model
        grid = (m.num_frames // m.t_patch_size, m.img_size // m.patch_size, m.img_size // m.patch_size)
        visible = masking.num_visible("random", grid, ratio)
        step_s, _, _ = common.time_steps(c, a.steps, repeats=a.repeats)
        out[name] = {"visible_tokens": visible, "median_step_s": step_s,
                     "train_tflop_per_clip": common.train_flops_per_clip(m, visible) / 1e12}
    out["flop_ratio"] = out["all_tokens"]["train_tflop_per_clip"] / out["masked"]["train_tflop_per_clip"]
    out["time_ratio"] = out["all_tokens"]["median_step_s"] / out["masked"]["median_step_s"]
    out["time_ratio_over_flop_ratio"] = out["time_ratio"] / out["flop_ratio"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
