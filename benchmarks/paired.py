"""Steps on request, for paired timing (`compare_torch.py --paired`). Standard library only, so the
PyTorch side imports it without JAX.

A worker builds and warms its training step, then calls `serve`: it prints one JSON line with
"ready": true, and for every line N it reads from stdin it times N steps and prints the result as
one JSON line. It returns at end of input or at an empty line. The driver keeps every worker alive
and asks them in turn, so the runs being compared are timed seconds apart instead of minutes, and a
slow spell of a shared machine falls on both sides of a pair.
"""

import json
import sys


def serve(time_steps, info: dict, stdin=None, stdout=None) -> int:
    """Answer step requests until end of input; `time_steps(n)` returns a JSON-able dict. Returns
    the number of requests answered."""
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    stdout.write(json.dumps({"ready": True, **info}) + "\n")
    stdout.flush()
    answered = 0
    for line in stdin:
        line = line.strip()
        if not line:
            break
        n = int(line)
        if n < 1:
            raise ValueError(f"step request must be a positive integer, got {line!r}")
        stdout.write(json.dumps(time_steps(n)) + "\n")
        stdout.flush()
        answered += 1
    return answered
