#!/usr/bin/env bash
# One sitting on a GPU box: the software seen, an attention cross-check, then
# benchmarks/train_step.py (ViT-L/16, 16x224x224, mask 0.9, bf16 unless overridden) once per variant.
#   bash benchmarks/gpu_sweep.sh "--batch=32" "--batch=32 --attention_impl=xla" \
#        "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false --batch=32" ...
# A variant is train_step.py flags, optionally led by VAR=value environment words.
# Results: one JSON line per variant in ${OUT:-/tmp/gpu_sweep}/results.jsonl, stderr in errors.log;
# PROFILE in a variant also saves prof_I.xplane.pb and hlo_I.txt.gz there. A table is printed last.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_sweep}
mkdir -p "$out"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,memory.total --format=csv
$py -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
# the padded cuDNN attention the model runs, against fp32 XLA attention (values and dq/dk/dv), beside
# XLA's own bf16 attention, on the decoder's shape (head_dim 32) and the encoder's (64)
$py benchmarks/attention.py --batch=4 --iters=1 --only=xla,cudnn_pad16 | tail -5
i=0
: >"$out/results.jsonl"
for variant in "$@"; do
  i=$((i + 1))
  envs=(); flags=()
  for w in $variant; do
    if [[ $w == PROFILE ]]; then flags+=("--profile_dir=$out/prof_$i" "--hlo_file=$out/hlo_$i.txt")
    elif [[ $w != --* && $w == *=* ]]; then envs+=("$w")
    else flags+=("$w"); fi
  done
  echo "== $i: $variant" | tee -a "$out/errors.log"
  if env "${envs[@]}" timeout "${VARIANT_TIMEOUT:-240}" $py benchmarks/train_step.py --size=vit_l --frames=16 \
      --img=224 --mask_ratio=0.9 --dtype=bfloat16 --steps=10 --repeats=3 "${flags[@]}" >"$out/one.json" \
      2>>"$out/errors.log"; then
    VARIANT="$variant" $py -c 'import json, os, sys; r = json.load(open(sys.argv[1])); r["variant"] = os.environ["VARIANT"]; print(json.dumps(r))' \
      "$out/one.json" >>"$out/results.jsonl"
  else
    echo "   failed:"; tail -3 "$out/errors.log"
  fi
  rm -f "$out/one.json"
  # a profile comes back flat: prof_I/**/*.xplane.pb -> prof_I.xplane.pb
  f=$(find "$out/prof_$i" -name '*.xplane.pb' 2>/dev/null | head -1)
  if [[ -n $f ]]; then mv "$f" "$out/prof_$i.xplane.pb"; fi
  rm -rf "$out/prof_$i"
  if [[ -f $out/hlo_$i.txt ]]; then gzip -f "$out/hlo_$i.txt"; fi
done
$py - "$out/results.jsonl" <<'PY'
import json, sys
print(f"{'step ms':>8} {'clips/s':>8} {'TFLOP/s':>8} {'MFU':>6} {'temp GiB':>8}  variant")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['median_step_s'] * 1e3:8.1f} {r['clips_per_s']:8.1f} {r['achieved_tflops']:8.1f}"
          f" {r.get('mfu', float('nan')):6.1%} {(r.get('temp_bytes') or 0) / 2**30:8.2f}  {r['variant']}")
PY
