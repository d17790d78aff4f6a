#!/usr/bin/env bash
# Run mae_st_jax on this machine, installing it first if needed.
# Usage: bash launch/local.sh [CONFIG] [WORKDIR] [--config.field=value ...]
#   defaults: CONFIG=configs/demo.py  WORKDIR=workdirs/demo
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:-configs/demo.py}"; [ $# -gt 0 ] && shift
WORKDIR="${1:-workdirs/demo}"; [ $# -gt 0 ] && shift
PYBIN="$(bash "$ROOT/launch/setup_env.sh")"
cd "$ROOT"
exec "$PYBIN" -m mae_st_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
