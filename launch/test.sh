#!/usr/bin/env bash
# The test command: install into a virtualenv (default .venv) if needed, then run pytest.
# Usage: bash launch/test.sh [pytest args]     (VENV=DIR picks another virtualenv)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYBIN="$(bash "$ROOT/launch/setup_env.sh")"
cd "$ROOT"
exec "$PYBIN" -m pytest -q -p no:cacheprovider tests "$@"
