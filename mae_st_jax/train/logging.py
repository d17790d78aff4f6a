"""Metric output: CLU writers (TensorBoard + log) on process 0 and `workdir/metrics.jsonl`."""

import json
import os

import jax
from clu import metric_writers


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
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": int(step), **scalars}) + "\n")

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def _truncate_after(path: str, step: int) -> None:
    """Drop lines logged after `step` (they belong to steps a resumed run will redo)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [l for l in f if l.strip()]
    kept = [l for l in lines if json.loads(l).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]
