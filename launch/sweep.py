"""Sweep runner: one `mae_st_jax.main` command per point of a config file's `sweep()`, printed or run here.

    python launch/sweep.py --config=configs/finetune.py:demo --workdir=workdirs/sweep \
        [--dry_run | --local [--keep_going]] [--points=0,2-3] [--python=PYBIN] [-- extra main.py flags]

`sweep()` returns a list of dicts {"dotted.config.field": value}. Point i runs with
`--workdir=WORKDIR/<ii>_<field=value,...>` and one `--config.field=value` per entry, written so that
ml_collections' config_flags parses it back to the same value and type; every point is checked that way
(and against `get_config(arg)`'s fields) before anything runs. The default is a dry run: commands are
printed one per line, shell-quoted, ready to paste or hand to a scheduler. `--local` runs them one after
another in this directory and stops at the first failure (`--keep_going`: runs the rest). A rerun
resumes each point from its workdir's newest checkpoint, as main.py always does.
"""

import argparse
import hashlib
import importlib.util
import pathlib
import re
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # config files import mae_st_jax; an installed copy still comes first

MAIN_MODULE = "mae_st_jax.main"
MAX_NAME_CHARS = 100  # of a point's directory name, index prefix included


class SweepError(ValueError):
    """A problem with the sweep a user can fix; the message is one line."""


# ----------------------------------------------------------------------------- config file and points

def split_config_spec(spec: str) -> tuple[str, str | None]:
    """'configs/finetune.py:demo' -> ('configs/finetune.py', 'demo'); split as config_flags does."""
    path, _, arg = spec.partition(":")
    return path, (arg if ":" in spec else None)


def load_config_module(path: str):
    """Import a config file by path, as the --config flag does."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise SweepError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(f"sweep_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("get_config", "sweep"):
        if not callable(getattr(module, name, None)):
            raise SweepError(f"config file {path} defines no {name}(); a sweep needs get_config(arg) and sweep() "
                             f"returning a list of {{'dotted.field': value}} dicts")
    return module


def get_config(module, config_spec: str):
    _, arg = split_config_spec(config_spec)
    try:
        return module.get_config() if arg is None else module.get_config(arg)
    except Exception as e:
        raise SweepError(f"--config={config_spec}: get_config failed: {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from None


def load_points(module, path: str) -> list[dict]:
    try:
        points = module.sweep()
    except Exception as e:
        raise SweepError(f"{path}: sweep() failed: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if not isinstance(points, (list, tuple)) or not points:
        raise SweepError(f"{path}: sweep() must return a non-empty list of dicts, got {points!r:.80}")
    for i, point in enumerate(points):
        if not isinstance(point, dict) or not all(isinstance(k, str) and k for k in point):
            raise SweepError(f"{path}: sweep() point {i} is not a dict of 'dotted.field' -> value: {point!r:.80}")
    return [{field: _plain(value) for field, value in p.items()} for p in points]


def select_points(spec: str | None, count: int) -> list[int]:
    """'0,2,4-6' -> [0, 2, 4, 5, 6]; None -> all of range(count)."""
    if not spec:
        return list(range(count))
    chosen = []
    for part in spec.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise SweepError(f"--points={spec}: give point indices like 0,2 or 1-3")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) else lo
        for i in range(lo, hi + 1):
            if i >= count:
                raise SweepError(f"--points={spec}: point {i} does not exist (the sweep has {count}: 0-{count - 1})")
            if i not in chosen:
                chosen.append(i)
    return chosen


# ----------------------------------------------------------------------------- values <-> flags

def format_value(value) -> str:
    """A config value as the text of `--config.field=TEXT` that config_flags parses back to `value`
    (its parser is chosen by the field's type: float(), int(), absl's bool words, the raw string,
    ast.literal_eval for tuples)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        return repr(value)
    raise SweepError(f"cannot write a {type(value).__name__} value {value!r:.60} as a --config flag "
                     f"(use float, int, bool, str or tuple)")


def _lookup(config, field: str):
    """(parent ConfigDict, leaf key) of a dotted field; (None, first missing key) when it does not exist."""
    node = config
    parts = field.split(".")
    for depth, key in enumerate(parts):
        is_leaf = depth == len(parts) - 1
        try:
            present = key in node
        except TypeError:
            present = False
        if not present or (not is_leaf and not hasattr(node[key], "keys")):
            return None, key
        if not is_leaf:
            node = node[key]
    return node, parts[-1]


def resolve_point(config, point: dict, index: int, config_spec: str) -> dict:
    """The values `point` gives its fields once stored in `config` (an int in a float field becomes a
    float); SweepError for an unknown field or a value of the wrong type."""
    resolved = {}
    for field, value in point.items():
        parent, key = _lookup(config, field)
        if parent is None:
            raise SweepError(f"sweep point {index} sets unknown config field '{field}' "
                             f"({config_spec} has no such field)")
        if hasattr(parent[key], "keys"):
            raise SweepError(f"sweep point {index} sets '{field}', which is a group of fields: "
                             f"set its leaves ('{field}.NAME') instead")
        try:
            parent[key] = value  # ConfigDict's own type check: int -> float is fine, float -> int is not
        except (TypeError, ValueError) as e:
            raise SweepError(f"sweep point {index} sets '{field}'={value!r}: wrong type for this field "
                             f"({' '.join(str(e).split())})") from None
        resolved[field] = parent[key]
    return resolved


def _plain(value):
    """numpy scalars (np.linspace points) as Python numbers, lists as tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if not isinstance(value, (str, bytes)) and hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    return value


def same_value(a, b) -> bool:
    """Equal and of the same type, element by element for tuples."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and a != a and b != b)  # nan == nan here


def parse_overrides(config_spec: str, overrides: list[str]):
    """The ConfigDict main.py would see for `--config=config_spec` plus `overrides`, parsed by
    ml_collections' config_flags exactly as main.py does (lock_config=True)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["main", f"--config={config_spec}", *overrides]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def check_round_trip(config_spec: str, index: int, resolved: dict, overrides: list[str]) -> None:
    """Parse a point's flags back through config_flags; SweepError if any field comes back different."""
    try:
        parsed = parse_overrides(config_spec, overrides)
    except Exception as e:  # absl's flag errors: IllegalFlagValueError, UnrecognizedFlagError, ...
        raise SweepError(f"sweep point {index}: config_flags rejects its flags: "
                         f"{' '.join(str(e).split())[:300]}") from None
    for field, want in resolved.items():
        parent, key = _lookup(parsed, field)
        got = parent[key]
        if not same_value(got, want):
            raise SweepError(f"sweep point {index}: '{field}'={want!r} ({type(want).__name__}) comes back from its "
                             f"flag as {got!r} ({type(got).__name__})")


# ----------------------------------------------------------------------------- names and commands

def _name_text(text: str) -> str:
    """Text made safe for (part of) a directory name: letters, digits and . _ + - only."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text.strip())


def _name_value(value) -> str:
    """A value as it appears in a point's name: 0.65, true, tube, 0.5_1.0 for (0.5, 1.0)."""
    if isinstance(value, tuple):
        return "_".join(_name_value(v) for v in value) or "empty"
    return _name_text(format_value(value)) or "empty"


def point_name(index: int, point: dict, width: int = 2) -> str:
    """'03_layer_decay=0.75,mixup_prob=1.0': index prefix (unique), then each field by its last name
    (its full dotted name where two fields of the point share a last name); long names are cut and end
    with a short hash of the full one."""
    prefix = f"{index:0{width}d}_"
    if not point:
        return prefix + "base"
    last = [f.rsplit(".", 1)[-1] for f in point]
    keys = [f if last.count(l) > 1 else l for f, l in zip(point, last)]
    body = ",".join(f"{_name_text(k)}={_name_value(v)}" for k, v in zip(keys, point.values()))
    name = prefix + body
    if len(name) > MAX_NAME_CHARS:
        digest = hashlib.sha1(body.encode()).hexdigest()[:8]
        name = name[:MAX_NAME_CHARS - 9].rstrip(",=") + "~" + digest
    return name


def join_workdir(workdir: str, name: str) -> str:
    return workdir.rstrip("/") + "/" + name  # a plain join, so gs:// workdirs stay intact


def check_extra_flags(extra: list[str], points: list[dict]) -> None:
    """Flags after `--` are passed to every point; they must not fight the sweep over what it sets."""
    swept = {f for p in points for f in p}
    for flag in extra:
        name = flag.lstrip("-").split("=", 1)[0]
        if name in ("config", "workdir"):
            raise SweepError(f"extra flag {flag}: the sweep sets --{name} itself; pass --{name} to sweep.py")
        if name.startswith("config.") and name[len("config."):] in swept:
            raise SweepError(f"extra flag {flag} would override the swept field '{name[len('config.'):]}' "
                             f"in every point; drop it or change sweep()")


def build_commands(config_spec: str, workdir: str, python: str | None = None, extra_flags=(),
                   points: str | None = None, check: bool = True) -> list[tuple[str, list[str]]]:
    """[(point name, argv)] for the chosen points of `config_spec`'s sweep(), validated (fields exist,
    types fit, flags parse back to the same values) before anything is returned."""
    path, _ = split_config_spec(config_spec)
    module = load_config_module(path)
    all_points = load_points(module, path)
    chosen = select_points(points, len(all_points))
    extra = list(extra_flags)
    check_extra_flags(extra, all_points)
    python = python or sys.executable
    width = max(2, len(str(len(all_points) - 1)))
    commands = []
    for i in chosen:
        resolved = resolve_point(get_config(module, config_spec), all_points[i], i, config_spec)
        overrides = [f"--config.{field}={format_value(value)}" for field, value in resolved.items()]
        if check:
            check_round_trip(config_spec, i, resolved, overrides)
        name = point_name(i, all_points[i], width)
        argv = [python, "-m", MAIN_MODULE, f"--config={config_spec}", f"--workdir={join_workdir(workdir, name)}",
                *overrides, *extra]
        commands.append((name, argv))
    return commands


# ----------------------------------------------------------------------------- running

def run_local(commands, keep_going: bool = False, log=None) -> int:
    """Run the commands one after another; returns the exit status for the whole sweep."""
    log = log or sys.stderr
    results = []
    stopped = None
    for n, (name, argv) in enumerate(commands):
        print(f"[sweep {n + 1}/{len(commands)}] {name}: {shlex.join(argv)}", file=log, flush=True)
        start = time.monotonic()
        try:
            code = subprocess.run(argv).returncode
        except KeyboardInterrupt:
            results.append((name, "interrupted", time.monotonic() - start))
            stopped = f"sweep: interrupted during point {name}"
            break
        except OSError as e:
            code = None
            print(f"sweep: point {name} could not start: {e}", file=log, flush=True)
        results.append((name, code, time.monotonic() - start))
        if code != 0:
            message = f"sweep: point {name} failed with exit code {code}"
            if not keep_going:
                stopped = message + "; stopping (--keep_going runs the remaining points)"
                break
            print(message + "; going on (--keep_going)", file=log, flush=True)
    print("sweep summary:", file=log)
    for name, code, seconds in results:
        status = "ok" if code == 0 else ("interrupted" if code == "interrupted" else f"FAILED (exit code {code})")
        print(f"  {name}: {status}, {seconds:.0f} s", file=log)
    not_run = [name for name, _ in commands[len(results):]]
    for name in not_run:
        print(f"  {name}: not run", file=log)
    failed = [r for r in results if r[1] != 0]
    print(f"  {len(results) - len(failed)} of {len(commands)} points succeeded", file=log, flush=True)
    if stopped:
        print(stopped, file=log, flush=True)
        return 130 if "interrupted" in stopped else 1
    return 1 if failed else 0


def parse_args(argv: list[str]):
    """sweep.py's own flags, and the extra main.py flags after a `--`."""
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="launch/sweep.py", description="Print or run one mae_st_jax.main command per point of a config's sweep().",
        epilog="Flags after `--` go to every main.py command, e.g. -- --config.total_steps=50")
    parser.add_argument("--config", required=True, help="config file and arg, e.g. configs/finetune.py:demo")
    parser.add_argument("--workdir", required=True, help="parent directory; point i runs in WORKDIR/<ii>_<name>")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry_run", action="store_true", help="print the commands, shell-quoted (the default)")
    mode.add_argument("--local", action="store_true", help="run the commands here, one after another")
    parser.add_argument("--keep_going", action="store_true", help="--local: run the remaining points after a failure")
    parser.add_argument("--points", default=None, help="indices of the points to use, e.g. 0,2 or 1-3 (default all)")
    parser.add_argument("--python", default=None, help="python for the commands (default: this one)")
    args = parser.parse_args(argv)
    return args, extra


def main(argv=None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        commands = build_commands(args.config, args.workdir, args.python, extra, args.points)
    except SweepError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    if not args.local:
        for _, command in commands:
            print(shlex.join(command))
        return 0
    return run_local(commands, keep_going=args.keep_going)


if __name__ == "__main__":
    sys.exit(main())
