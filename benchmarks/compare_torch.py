"""Our pre-training step vs the PyTorch reference's, interleaved in one sitting on this machine.

python benchmarks/compare_torch.py --ref_dir=/path/to/mae_st --shim_dir=/path/to/shim \
    --size=vit_b --frames=16 --img=112 --batch=4 --mask_ratio=0.9 --rounds=2 --threads=2

Alternates `benchmarks/train_step.py` (ours, JAX) and `benchmarks/torch_reference.py` (the
reference's model code and training step) as subprocesses, round r running ours then the reference
when r is even and the reference then ours when odd, records the 1-minute load average around
each run, and prints every run's clips/s with the medians and their ratio as JSON. Same model
config (decoder 512 x 4, t_patch 2, pred_t_dim = frames / 2, norm_pix_loss, sep pos-embed and cls
token), same batch, fp32, AdamW with the same weight-decay groups, gradient clipping 0.02 on both.
--variants picks what runs: ours and the reference as shipped, the reference with our glibc malloc
settings (reference_malloc), ours without them (ours_plain_malloc). All get the same cores: torch.set_num_threads(threads), and, where the machine has more than
`threads` cores, both processes are pinned to cores 0..threads-1 with taskset (XLA:CPU sizes its
thread pool from the cores the process may use).

--paired keeps one process of each variant alive (train_step.py / torch_reference.py --serve,
benchmarks/paired.py) and asks them in turn for --steps steps, --rounds times, the order reversed
every other round, with --gap seconds of quiet before each turn. Each round then gives a ratio of two
timings taken seconds apart, and the reported ratio is the median of these per-round ratios (its
quartiles beside it): on a shared VM whose speed drifts over minutes, this compares the two sides
under the same conditions, where whole runs minutes apart do not.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repo root
from mae_st_jax import host_malloc  # noqa: E402

# glibc: one arena (worker threads' large blocks otherwise always come from fresh mmaps), no mmap,
# no trimming: freed temporaries are reused without page faults. Our entry points set these
# themselves on CPU-only machines (mae_st_jax/host_malloc.py); the reference does not.
MALLOC_ENV = dict(host_malloc.SETTINGS)
# name -> (which script, extra environment). "ours" and "reference" run as shipped;
# "reference_malloc" gives the reference our malloc settings; "ours_plain_malloc" turns ours off.
VARIANTS = {"ours": ("ours", {}), "reference": ("reference", {}),
            "reference_malloc": ("reference", MALLOC_ENV),
            "ours_plain_malloc": ("ours", {host_malloc.OPT_OUT: "0"})}


def parse_json(stdout: str) -> dict:
    start = stdout.index("\n{") + 1 if not stdout.startswith("{") else 0
    return json.loads(stdout[start:])


def cpu_ticks():
    """(busy, steal, total) jiffies of all cores from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    steal = v[7] if len(v) > 7 else 0
    return sum(v[:8]) - idle - steal, steal, sum(v[:8])


def tick_fractions(ticks0, ticks1) -> dict:
    """Whole-machine busy and hypervisor-steal fractions between two cpu_ticks() readings."""
    if not (ticks0 and ticks1):
        return {}
    total = max(ticks1[2] - ticks0[2], 1)
    return {"cpu_busy_frac": round((ticks1[0] - ticks0[0]) / total, 3),
            "cpu_steal_frac": round((ticks1[1] - ticks0[1]) / total, 3)}


def record(runs, name, r, step_s, out, info, note=""):
    """Append one timing of variant `name` in round `r` to `runs` and print its line."""
    runs[name].append({"round": r, "clips_per_s": out["clips_per_s"], "median_step_s": step_s,
                       "cpu_s_per_step": out.get("cpu_s_per_step"), "minflt_per_step": out.get("minflt_per_step"),
                       **info})
    print(f"round {r} {name:17s} {out['clips_per_s']:.3f} clips/s ({step_s:.3f} s/step)"
          f"  faults/step {out.get('minflt_per_step')}{note}", file=sys.stderr, flush=True)


def run(cmd, env=None) -> tuple[dict, dict]:
    info = {"load_before": os.getloadavg()[0]}
    ticks0 = cpu_ticks()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    info["load_after"] = os.getloadavg()[0]
    info.update(tick_fractions(ticks0, cpu_ticks()))  # the machine while it ran
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return parse_json(proc.stdout), info


def run_sequential(a, names, commands, runs):
    """`a.rounds` rounds of one fresh process per variant (compile, warm-up, --repeats timings of
    --steps steps). Returns (host_cpu, torch_build) as the processes report them."""
    host_cpu = torch_build = None
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            script, extra_env = VARIANTS[name]
            out, info = run(commands[script], dict(os.environ, **extra_env))
            host_cpu = host_cpu or out.get("host_cpu")
            torch_build = torch_build or out.get("torch_build")
            record(runs, name, r, out["median_step_s"], out, info,
                   f"  load {info['load_before']:.2f} -> {info['load_after']:.2f}"
                   f"  steal {info.get('cpu_steal_frac', float('nan')):.3f}")
    return host_cpu, torch_build


class Worker:
    """One long-lived `--serve` process (benchmarks/paired.py): `steps(n)` times n steps there."""

    def __init__(self, name, cmd, env, log):
        self.name, self.cmd, self.log = name, cmd, log
        self.proc = subprocess.Popen(cmd + ["--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, text=True, env=env)
        self.info = self._answer()
        if not self.info.get("ready"):
            self._fail("no ready line")

    def _fail(self, why):
        self.proc.kill()
        self.log.flush()
        self.log.seek(0)
        sys.stderr.write(self.log.read()[-4000:])
        raise SystemExit(f"{self.name} worker: {why}: {' '.join(self.cmd)} --serve")

    def _answer(self) -> dict:
        while True:  # skip anything else a library prints to stdout
            line = self.proc.stdout.readline()
            if not line:
                self._fail(f"exited ({self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def steps(self, n: int) -> dict:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=300)


def run_paired(a, names, commands, runs):
    """Start every variant's worker (one after the other, each compiled and warm before the next
    starts), then `a.rounds` rounds of one `a.steps`-step timing each. Returns the workers' ready lines."""
    import tempfile
    workers, infos = {}, {}
    try:
        for name in names:
            script, extra_env = VARIANTS[name]
            log = tempfile.TemporaryFile("w+")
            workers[name] = Worker(name, commands[script], dict(os.environ, **extra_env), log)
            infos[name] = workers[name].info
        for r in range(a.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                time.sleep(a.gap)  # the other side's thread pools go idle
                ticks0 = cpu_ticks()
                out = workers[name].steps(a.steps)
                record(runs, name, r, out["step_s"], out, tick_fractions(ticks0, cpu_ticks()))
        for w in workers.values():
            w.close()
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
    return infos


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref_dir", required=True)
    ap.add_argument("--shim_dir", default="")
    ap.add_argument("--size", default="vit_b")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--img", type=int, default=112)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--mask_ratio", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed repeat (both)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per run; each run reports their median")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paired", action="store_true",
                    help="keep one process per variant alive and time them in turn (see above); --rounds "
                         "is then the number of turns each, --steps the steps per turn, --repeats unused")
    ap.add_argument("--gap", type=float, default=0.5, help="--paired: seconds of quiet before each turn")
    ap.add_argument("--target", type=float, default=1.3, help="the ratio to report pass/fail against")
    ap.add_argument("--variants", default="ours,reference,reference_malloc",
                    help="comma-separated, from %s, run in this order (reversed every other round); the "
                         "ratio is ours/reference whatever the order (first/second where they are not both "
                         "given), and every other variant is also reported against the numerator" % sorted(VARIANTS))
    a = ap.parse_args()

    clip = ["--size", a.size, "--frames", str(a.frames), "--img", str(a.img), "--batch", str(a.batch),
            "--mask_ratio", str(a.mask_ratio), "--steps", str(a.steps), "--repeats", str(a.repeats)]
    pin = []
    if (os.cpu_count() or 1) > a.threads and shutil.which("taskset"):
        pin = ["taskset", "-c", f"0-{a.threads - 1}"]
    ours = pin + [sys.executable, os.path.join(HERE, "train_step.py"), "--dtype", "float32"] + clip
    ref = pin + [sys.executable, os.path.join(HERE, "torch_reference.py"), "--ref_dir", a.ref_dir,
                 "--threads", str(a.threads)] + (["--shim_dir", a.shim_dir] if a.shim_dir else []) + clip
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or len(names) < 2 or len(set(names)) != len(names):
        sys.exit(f"--variants: give at least two distinct names from {sorted(VARIANTS)}, got {a.variants!r}")
    commands = {"ours": ours, "reference": ref}
    runs = {n: [] for n in names}
    if a.paired:
        infos = run_paired(a, names, commands, runs)
        host_cpu = next((i["host_cpu"] for i in infos.values() if "host_cpu" in i), None)
        torch_build = next((i["torch_build"] for i in infos.values() if "torch_build" in i), None)
    else:
        host_cpu, torch_build = run_sequential(a, names, commands, runs)
    med = {k: statistics.median(x["clips_per_s"] for x in v) for k, v in runs.items()}
    # the criterion's ratio does not depend on which variant ran first
    num, den = ("ours", "reference") if {"ours", "reference"} <= set(names) else names[:2]
    ratios = {f"{num}/{n}": med[num] / med[n] for n in names if n != num}
    ratio = med[num] / med[den]
    paired = None
    if a.paired:  # the same round's two timings: seconds apart, under the same machine conditions
        per_round = [x["clips_per_s"] / y["clips_per_s"] for x, y in zip(runs[num], runs[den])]
        q = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
        paired = {"of": f"{num}/{den}", "per_round": per_round, "median": statistics.median(per_round),
                  "quartiles": [q[0], q[2]], "ratio_of_medians": ratio}
        ratio = paired["median"]
    # CPU seconds per clip (user + system of the benchmark process): less sensitive to other load
    cpu = {k: statistics.median(x["cpu_s_per_step"] / a.batch for x in v) for k, v in runs.items()}

    def shown(name):
        script, extra_env = VARIANTS[name]
        return " ".join([f"{k}={v}" for k, v in extra_env.items()] + commands[script])

    result = {"config": {k: v for k, v in vars(a).items() if k not in ("ref_dir", "shim_dir")},
              "cpus": os.cpu_count(), "host_cpu": host_cpu, "torch_build": torch_build, "commands": {n: shown(n) for n in names},
              "runs": runs, "median_clips_per_s": med, "ratios": ratios,
              "ratio": {"of": f"{num}/{den}", "value": ratio,
                        "statistic": "median of per-round ratios" if a.paired else "ratio of median clips/s"},
              "paired": paired,
              "median_cpu_s_per_clip": cpu, "target": a.target, "meets_target": ratio >= a.target}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
