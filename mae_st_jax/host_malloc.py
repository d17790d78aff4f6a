"""Keep XLA:CPU's per-step scratch memory mapped between steps (glibc malloc settings).

XLA:CPU allocates one scratch block per executed step (about 0.9 GiB for a ViT-B/16 16x112 batch-4
pre-training step) and frees it at the end. glibc serves blocks that large with a fresh mmap and
gives them back with munmap, so every step page-faults its whole scratch in again: ~240K faults,
~0.6 CPU-seconds per step on a 2-core machine, 10-12% of the step. With one malloc arena, no mmap
for large blocks and no trimming, the block is reused and the faults go away.

glibc reads these settings once, when the process starts (setting them later with mallopt does not
move XLA's block out of mmap here), so the command-line entry points call `reexec()` first: when
the process runs on CPU only and the settings are missing, it re-executes itself with them set in
the environment. It does nothing on machines with a GPU or TPU (one arena would make the host
input pipeline's threads contend for the allocator there), off glibc, in interactive sessions and
notebooks, with MAE_ST_HOST_MALLOC=0, or when any of these variables is already set. Memory freed
by a run is kept by the process, not returned to the system, until the process exits.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
OPT_OUT = "MAE_ST_HOST_MALLOC"
_ACCELERATOR_DEVICES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/accel*", "/dev/vfio/[0-9]*", "/dev/kfd")


def cpu_only(environ=os.environ, exists=glob.glob) -> bool:
    """True when JAX will run on CPU: JAX_PLATFORMS names only cpu, or no GPU/TPU device node exists."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").lower().split(",") if p.strip()]
    if platforms:
        return platforms == ["cpu"]
    return not any(exists(pattern) for pattern in _ACCELERATOR_DEVICES)


def wanted(environ=os.environ, exists=glob.glob, libc: str | None = None, argv: list[str] | None = None) -> bool:
    """Whether `reexec` would re-execute this process (see the module docstring)."""
    if environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(k in environ for k in SETTINGS):
        return False  # set by the user (kept as they are), or this is the re-executed process
    libc = platform.libc_ver()[0] if libc is None else libc
    argv = getattr(sys, "orig_argv", None) if argv is None else argv
    if not sys.platform.startswith("linux") or libc != "glibc" or not argv or len(argv) < 2:
        return False  # argv: the interpreter and what it ran (no re-exec from a REPL or notebook)
    return cpu_only(environ, exists)


def reexec() -> None:
    """Re-execute the running command with SETTINGS in the environment when `wanted()`; else return."""
    if not wanted():
        return
    env = dict(os.environ, **SETTINGS)
    argv = list(sys.orig_argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
