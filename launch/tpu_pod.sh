#!/usr/bin/env bash
# Run mae_st_jax on every worker of a Cloud TPU VM (one host or a pod slice), from your own machine.
#
# Usage:
#   bash launch/tpu_pod.sh --tpu=NAME --zone=ZONE --workdir=gs://BUCKET/RUN [--project=PROJECT] \
#       [--config=configs/pretrain.py:vit_l,k400] [--dry_run] [--foreground] [--skip_install] \
#       [--remote_dir=mae_st_jax] [--remote_python=python3] [--log=mae_st_jax.log] [-- extra main.py flags]
#
# Steps, one command each (--dry_run prints them shell-quoted, one per line, and runs nothing; no gcloud needed):
#   1. pack this working tree, without .git, .venv, workdirs and caches, into a tarball (tar);
#   2. copy it to all workers: gcloud compute tpus tpu-vm scp ... --worker=all;
#   3. on all workers: unpack into ~/REMOTE_DIR (replaced at each launch), create the venv ~/REMOTE_DIR.venv
#      if missing and `pip install -e ~/REMOTE_DIR "jax[tpu]"` (--skip_install: only unpack);
#   4. on all workers at once: python -m mae_st_jax.main --config=CONFIG --workdir=WORKDIR [extra flags],
#      from ~/REMOTE_DIR (so config paths are the repo's). jax.distributed finds the other workers by
#      itself on a TPU VM (mae_st_jax/distributed.py). Default: detached with nohup, output in ~/LOG on
#      each worker (the command that follows worker 0's log is printed at the end); --foreground: stream
#      all workers' output here until the run ends (it stops if this ssh session dies).
# WORKDIR must be one directory all workers share (gs://...): every host writes its part of a checkpoint.
# The default CONFIG is configs/demo.py, a few-minute check of a new slice.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

quote() {  # the arguments as one line that a POSIX shell reads back as the same words
  local out="" word sq="'" esc="'\\''"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then out+="$word "; else out+="'${word//$sq/$esc}' "; fi
  done
  printf '%s' "${out% }"
}

TPU="" ZONE="" PROJECT="" CONFIG="configs/demo.py" WORKDIR="" DRY_RUN=0 FOREGROUND=0 SKIP_INSTALL=0
REMOTE_DIR="mae_st_jax" REMOTE_PYTHON="python3" LOG="mae_st_jax.log"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --remote_dir=*) REMOTE_DIR="${1#*=}" ;;
    --remote_python=*) REMOTE_PYTHON="${1#*=}" ;;
    --log=*) LOG="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    --foreground) FOREGROUND=1 ;;
    --skip_install) SKIP_INSTALL=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (flags for main.py go after --; see --help)" ;;
  esac
  shift
done

[ -n "$TPU" ] || die "--tpu=NAME is required (the TPU VM's name, as 'gcloud compute tpus tpu-vm list' shows it)"
[ -n "$ZONE" ] || die "--zone=ZONE is required (the TPU VM's zone, e.g. us-central2-b)"
[ -n "$WORKDIR" ] || die "--workdir=DIR is required: one directory all workers share, e.g. gs://BUCKET/run"
[ -f "$ROOT/${CONFIG%%:*}" ] || die "--config=$CONFIG: no file ${CONFIG%%:*} in $ROOT (give a path inside the repo)"
REMOTE_DIR="${REMOTE_DIR#\~/}" LOG="${LOG#\~/}"  # relative paths on a worker are under its home anyway
case "$REMOTE_DIR" in
  ""|/|.|..|./|"~"|/home|/home/*/|/root|/tmp) die "--remote_dir=$REMOTE_DIR: give a directory of its own (it is replaced at each launch)" ;;
esac
for arg in "${EXTRA[@]+"${EXTRA[@]}"}"; do
  case "$arg" in
    --config=*|--workdir=*) die "extra flag '$arg': give ${arg%%=*} to tpu_pod.sh itself, before the --" ;;
  esac
done
case "$WORKDIR" in
  gs://*) ;;
  *) echo "tpu_pod.sh: warning: --workdir=$WORKDIR is not gs://; on a multi-host slice all workers must see" \
          "the same directory (a shared mount), or checkpointing fails" >&2 ;;
esac

GCLOUD_FLAGS=(--zone="$ZONE")
[ -z "$PROJECT" ] || GCLOUD_FLAGS+=(--project="$PROJECT")
TARBALL="${TMPDIR:-/tmp}/mae_st_jax-$TPU.tar.gz"

remote_path() {  # a worker path as a word for the worker's shell: relative ones under "$HOME"
  case "$1" in /*) quote "$1" ;; *) printf '"$HOME"/%s' "$(quote "$1")" ;; esac
}
CODE="$(remote_path "$REMOTE_DIR")"
REMOTE_TARBALL="$REMOTE_DIR.tar.gz"
TARBALL_THERE="$(remote_path "$REMOTE_TARBALL")"
VENV_THERE="$(remote_path "$REMOTE_DIR.venv")"
LOG_THERE="$(remote_path "$LOG")"

# What runs on each worker (one line; its login shell is bash on the TPU VM images).
INSTALL_SCRIPT="set -euo pipefail; rm -rf $CODE; mkdir -p $CODE; tar -xzf $TARBALL_THERE -C $CODE; rm -f $TARBALL_THERE"
if [ "$SKIP_INSTALL" = 0 ]; then
  INSTALL_SCRIPT+="; $(quote "$REMOTE_PYTHON") -c 'import sys; sys.exit(sys.version_info < (3, 11))'"
  INSTALL_SCRIPT+=" || { echo \"\$(hostname): mae_st_jax needs Python >= 3.11: pass --remote_python=python3.11 or newer\" >&2; exit 1; }"
  INSTALL_SCRIPT+="; [ -x $VENV_THERE/bin/python ] || $(quote "$REMOTE_PYTHON") -m venv $VENV_THERE"
  INSTALL_SCRIPT+="; $VENV_THERE/bin/python -m pip install -q --upgrade pip"
  INSTALL_SCRIPT+="; $VENV_THERE/bin/python -m pip install -q -e $CODE 'jax[tpu]'"
fi
INSTALL_SCRIPT+="; echo \"\$(hostname): ready\""

MAIN="$VENV_THERE/bin/python -m mae_st_jax.main $(quote --config="$CONFIG" --workdir="$WORKDIR" "${EXTRA[@]+"${EXTRA[@]}"}")"
if [ "$FOREGROUND" = 1 ]; then
  RUN_SCRIPT="set -o pipefail; cd $CODE && $MAIN 2>&1 | tee $LOG_THERE"
else
  RUN_SCRIPT="cd $CODE && { nohup $MAIN > $LOG_THERE 2>&1 < /dev/null & }; echo \"\$(hostname): started pid \$!, log ~/$LOG\""
fi

step() {  # print (dry run) or show and run one command
  if [ "$DRY_RUN" = 1 ]; then
    quote "$@"; echo
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

if [ "$DRY_RUN" = 0 ]; then
  command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI (or look with --dry_run)"
  trap 'rm -f "$TARBALL"' EXIT
fi
step tar -czf "$TARBALL" -C "$ROOT" --exclude=.git --exclude=.venv --exclude=workdirs --exclude=__pycache__ \
  --exclude='*.egg-info' --exclude=.pytest_cache .
step gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU:$REMOTE_TARBALL" "${GCLOUD_FLAGS[@]}" --worker=all
step gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --worker=all --command="$INSTALL_SCRIPT"
step gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --worker=all --command="$RUN_SCRIPT"
if [ "$FOREGROUND" = 0 ]; then
  echo "# follow worker 0's log with:" >&2
  quote gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_FLAGS[@]}" --worker=0 --command="tail -f $LOG_THERE" >&2
  echo >&2
fi
