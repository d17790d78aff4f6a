"""Step time with the encoder on all tokens vs on the visible 10%, beside the FLOP ratio.

python benchmarks/masking_speedup.py --size=vit_b --frames=16 --img=112 --batch=4
"All tokens" masks a single token (the loss needs at least one masked token), which is the
reference's encoder cost at mask ratio 0 up to one token in L. Both steps are compiled first and
then timed alternately in one process. No TensorFlow imported.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
from mae_st_jax import host_malloc  # noqa: E402

if __name__ == "__main__":  # the settings `python -m mae_st_jax.main` runs with
    host_malloc.reexec()

import jax  # noqa: E402

from benchmarks import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    common.add_clip_args(ap)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    out = {"device": jax.devices()[0].device_kind, **vars(a)}
    runs = {}
    for name, ratio in (("masked", a.mask_ratio), ("all_tokens", 1e-9)):
        c = common.make_config(a.size, a.frames, a.img, a.batch, ratio, a.dtype)
        common.apply_overrides(c, a.set)
        m = c.model
        visible = common.num_visible(m, ratio, "random")
        runs[name] = common.StepTimer(c)
        runs[name].warm(2)
        out[name] = {"visible_tokens": visible, "train_tflop_per_clip": common.train_flops_per_clip(m, visible) / 1e12,
                     "step_times_s": []}
    # interleaved (masked, all, all, masked, ...) so a change in machine load hits both alike
    for r in range(a.repeats):
        for name in (("masked", "all_tokens") if r % 2 == 0 else ("all_tokens", "masked")):
            out[name]["step_times_s"].append(runs[name].time(a.steps))
    for name in runs:
        out[name]["median_step_s"] = statistics.median(out[name]["step_times_s"])
        out[name]["median_cpu_s_per_step"] = statistics.median(runs[name].cpu_s)
    out["flop_ratio"] = out["all_tokens"]["train_tflop_per_clip"] / out["masked"]["train_tflop_per_clip"]
    out["time_ratio"] = out["all_tokens"]["median_step_s"] / out["masked"]["median_step_s"]
    out["time_ratio_over_flop_ratio"] = out["time_ratio"] / out["flop_ratio"]
    # the same with CPU seconds (user + system) per step: less sensitive to other load on the machine
    out["cpu_time_ratio"] = out["all_tokens"]["median_cpu_s_per_step"] / out["masked"]["median_cpu_s_per_step"]
    out["cpu_time_ratio_over_flop_ratio"] = out["cpu_time_ratio"] / out["flop_ratio"]
    out["load_avg_1m"] = os.getloadavg()[0]
    out["host_cpu"] = common.cpu_description()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
