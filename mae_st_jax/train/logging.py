"""Metric output: CLU writers (TensorBoard + log) on process 0 and `workdir/metrics.jsonl`."""

import json
import os

import jax
from absl import logging
from clu import metric_writers

from mae_st_jax import fileio


class MetricsLog:
    """Writes scalars to CLU (TensorBoard + absl log) and appends them to metrics.jsonl."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.is_main = jax.process_index() == 0
        self.writer = metric_writers.create_default_writer(workdir, just_logging=not self.is_main)
        self.path = os.path.join(workdir, "metrics.jsonl")
        if self.is_main:
            _truncate_after(self.path, resume_step)

    def write(self, step: int, scalars: dict) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        self.writer.write_scalars(step, scalars)
        if self.is_main:
            with fileio.open_file(self.path, "a") as f:
                f.write(json.dumps({"step": int(step), **scalars}) + "\n")

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def _parse_lines(path: str) -> tuple[list[str], list[dict], int]:
    """(lines, their records, unparsable lines) of a metrics.jsonl; a line torn by a crash or a full
    disk (a partial JSON object) is left out instead of stopping every later resume."""
    lines, recs, bad = [], [], 0
    with fileio.open_file(path) as f:
        for line in f.read().splitlines(keepends=True):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            lines.append(line if line.endswith("\n") else line + "\n")
            recs.append(rec)
    return lines, recs, bad


def _truncate_after(path: str, step: int) -> None:
    """Drop lines logged after `step` (they belong to steps a resumed run will redo) and torn lines."""
    if not fileio.exists(path):
        return
    lines, recs, bad = _parse_lines(path)
    if bad:
        logging.warning("%s: dropped %d unparsable (torn) line(s)", path, bad)
    kept = [l for l, r in zip(lines, recs) if r.get("step", 0) <= step]
    if len(kept) != len(lines) or bad:
        fileio.write_text(path, "".join(kept))


def read_metrics(workdir: str) -> list[dict]:
    """The records of workdir/metrics.jsonl in order (torn lines left out)."""
    return _parse_lines(os.path.join(workdir, "metrics.jsonl"))[1]
