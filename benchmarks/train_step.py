"""Median pre-training step time, clips/s, train TFLOPs per clip and MFU on synthetic batches.

python benchmarks/train_step.py --size=vit_l --frames=16 --img=224 --batch=32 --dtype=bfloat16
Imports no TensorFlow: runs on a bare accelerator box with jax/flax/optax/orbax.
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

from benchmarks import common, paired  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    common.add_clip_args(ap)
    ap.add_argument("--remat", default="none")
    ap.add_argument("--attention_impl", default="")
    ap.add_argument("--fsdp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile_dir", default="", help="after timing, trace 3 more steps there (jax.profiler)")
    ap.add_argument("--hlo_file", default="", help="write the compiled step's optimized HLO text there")
    ap.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak x devices; 0 = known table")
    ap.add_argument("--serve", action="store_true",
                    help="after compile + 2 warm-up steps, time steps on request (benchmarks/paired.py): "
                         "what compare_torch.py --paired runs")
    a = ap.parse_args()
    c = common.make_config(a.size, a.frames, a.img, a.batch, a.mask_ratio, a.dtype, a.remat, a.attention_impl,
                           a.fsdp)
    common.apply_overrides(c, a.set)
    m = c.model
    visible = common.num_visible(m)
    malloc_env = {k: os.environ[k] for k in host_malloc.SETTINGS if k in os.environ}  # as re-executed
    if a.serve:
        timer = common.StepTimer(c)
        timer.warm(2)

        def time_steps(n):
            step_s = timer.time(n)
            return {"step_s": step_s, "clips_per_s": a.batch / step_s, "cpu_s_per_step": timer.cpu_s[-1],
                    "minflt_per_step": timer.minflt[-1]}

        paired.serve(time_steps, {"host_cpu": common.cpu_description(), "compile_s": timer.compile_s,
                                  "host_malloc": malloc_env})
        return
    times, timer = common.time_steps(c, a.steps, repeats=a.repeats)
    step_s, compile_s, memory = statistics.median(times), timer.compile_s, timer.memory
    flops = common.train_flops_per_clip(m, visible)
    if a.hlo_file:
        os.makedirs(os.path.dirname(os.path.abspath(a.hlo_file)), exist_ok=True)
        with open(a.hlo_file, "w") as f:
            f.write(timer.compiled.as_text())
    if a.profile_dir:
        with jax.profiler.trace(a.profile_dir):
            timer.warm(3)
    result = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(),
              "host_cpu": common.cpu_description(), **vars(a),
              "median_step_s": step_s, "clips_per_s": a.batch / step_s, "step_times_s": times,
              "cpu_s_per_step": statistics.median(timer.cpu_s), "minflt_per_step": statistics.median(timer.minflt),
              "train_tflop_per_clip": flops / 1e12, "achieved_tflops": flops * a.batch / step_s / 1e12,
              "compile_s": compile_s,
              "host_malloc": malloc_env}
    peak = common.peak_tflops(a.peak_tflops)
    if peak:
        result["mfu"] = result["achieved_tflops"] / peak
    if memory is not None:
        result["temp_bytes"] = getattr(memory, "temp_size_in_bytes", None)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
