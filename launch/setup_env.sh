#!/usr/bin/env bash
# Create (or reuse) a virtualenv with mae_st_jax and everything its tests need.
# Usage: source-free: `bash launch/setup_env.sh [VENV_DIR]` ; prints the venv's python path last.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${VENV:-$ROOT/.venv}}"
PY="${PYTHON:-python3}"
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if [ -x "$VENV/bin/python" ] && ! new_enough "$VENV/bin/python"; then
  echo "setup_env.sh: $VENV holds Python $("$VENV/bin/python" -V 2>&1 | cut -d' ' -f2), mae_st_jax needs >= 3.11:" \
       "remove it (rm -rf $VENV) and rerun with PYTHON=python3.11 (or newer)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ] && ! new_enough "$PY"; then
  echo "setup_env.sh: $PY is $("$PY" -V 2>&1 || echo missing), mae_st_jax needs Python >= 3.11:" \
       "rerun with PYTHON=python3.11 (or newer; on Debian/Ubuntu also the python3.11-venv package)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
fi
if ! "$VENV/bin/python" -c "import mae_st_jax, torch, pytest" 2>/dev/null \
   || [ "$ROOT/setup.py" -nt "$VENV/.mae_st_jax_installed" ]; then
  # torch: a CPU build for the checkpoint importer and its tests (see README)
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" >&2
  touch "$VENV/.mae_st_jax_installed"
fi
echo "$VENV/bin/python"
