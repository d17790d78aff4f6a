#!/usr/bin/env bash
# Does pre-training help? Pre-trains the demo model for fine-tuning (configs/demo.py:long), then
# fine-tunes it (configs/finetune.py:demo) from those weights and, with the same seed, data and steps,
# from scratch, and prints both validation top-1 curves. About 20 minutes on 2 CPU cores.
# Usage: bash launch/demo_finetune.sh [WORKDIR] [--config.field=value ...]
#   default WORKDIR=workdirs/demo_finetune (runs in pretrain/, finetune/, scratch/); the flags go to all
#   three runs (e.g. --config.seed=1); PRETRAIN_FLAGS / FINETUNE_FLAGS add flags to one stage only.
#   Run it again to resume: finished stages are skipped (their checkpoints are at total_steps).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${1:-workdirs/demo_finetune}"; [ $# -gt 0 ] && shift
PYBIN="$(bash "$ROOT/launch/setup_env.sh")"
cd "$ROOT"
read -r -a pre_flags <<<"${PRETRAIN_FLAGS:-}"
read -r -a ft_flags <<<"${FINETUNE_FLAGS:-}"
main() { "$PYBIN" -m mae_st_jax.main "$@"; }
main --config=configs/demo.py:long --workdir="$WORKDIR/pretrain" "$@" ${pre_flags[@]+"${pre_flags[@]}"}
main --config=configs/finetune.py:demo --workdir="$WORKDIR/finetune" --config.init_from="$WORKDIR/pretrain" \
  "$@" ${ft_flags[@]+"${ft_flags[@]}"}
main --config=configs/finetune.py:demo --workdir="$WORKDIR/scratch" "$@" ${ft_flags[@]+"${ft_flags[@]}"}
"$PYBIN" - "$WORKDIR" <<'PY'
import json, pathlib, sys

# metrics.jsonl read here, not with mae_st_jax.train.logging.read_metrics: importing that module loads
# TensorFlow through CLU's writers (10-30 s here) for a three-line read
def top1(run):  # {step: validation top-1}, the last line of a step winning (a resumed run repeats steps)
    rows = (json.loads(line) for line in (pathlib.Path(sys.argv[1]) / run / "metrics.jsonl").open())
    return {r["step"]: r["eval_top1"] for r in rows if "eval_top1" in r}

pre, scratch = top1("finetune"), top1("scratch")
if not pre or not scratch:
    sys.exit("no eval_top1 in finetune/ or scratch/ metrics.jsonl: was validation switched off (config.data.num_eval_videos=0)?")
print(f"{'step':>6} {'pre-trained':>12} {'scratch':>8}")
for step in sorted(set(pre) | set(scratch)):
    print(f"{step:>6} {pre.get(step, float('nan')):12.2%} {scratch.get(step, float('nan')):8.2%}")
last = max(pre)
print(f"validation top-1 at step {last}: pre-trained {pre[last]:.2%}, scratch {scratch.get(last, float('nan')):.2%}")
PY
