"""Shared benchmark helpers (no TensorFlow): configs from flags, the FLOP model, timing, peaks."""

import ast
import math
import os
import resource
import statistics
import time

import jax
import numpy as np

from mae_st_jax import config_lib, masking
from mae_st_jax.models.mae import model_kwargs, token_grid
from mae_st_jax.train import optim, sharding as shd, step as step_lib
from mae_st_jax.models import MaskedAutoencoder, layers

# dense bf16 peak TFLOP/s per chip (REFERENCE.md); match on jax's device_kind
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def add_clip_args(ap) -> None:
    """Flags both benchmarks take: model size, clip shape, batch, mask ratio, dtype."""
    ap.add_argument("--size", default="vit_b")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--img", type=int, default=112)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--mask_ratio", type=float, default=0.9)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="any config override, e.g. --set=model.scan_layers=True (repeatable)")


def apply_overrides(config, overrides) -> None:
    """`FIELD=VALUE` strings onto the config (VALUE parsed as a Python literal, else a string) through
    ConfigDict's own dotted-field update, locked as main.py's config_flags locks it, so an unknown
    field or a value of the wrong type is a one-line exit; then the validation main.py runs."""
    values = {}
    for item in overrides:
        field, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            values[field] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            values[field] = raw
    config.lock()
    try:
        for field, value in values.items():
            try:
                config.update_from_flattened_dict({field: value})
            except (KeyError, AttributeError):
                raise SystemExit(f"--set: the config has no field {field!r}") from None
            except (TypeError, ValueError) as e:
                raise SystemExit(f"--set {field}: {' '.join(str(e).split())[:200]}") from None
    finally:
        config.unlock()
    config_lib.validate(config, jax.device_count(), jax.process_count())


def make_config(size: str, frames: int, img: int, batch: int, mask_ratio: float, dtype: str,
                remat: str = "none", attention_impl: str = "", fsdp: int = 1):
    c = config_lib.base_config()
    c.model.update(model_kwargs(size), num_frames=frames, img_size=img, pred_t_dim=frames // 2,
                   mask_ratio=mask_ratio, dtype=dtype, remat=remat, attention_impl=attention_impl)
    c.batch_size = batch
    c.data.repeat_aug = 1  # synthetic batches: only the step is timed
    c.total_steps = 1000
    c.warmup_steps = 10
    c.mesh.update(data=-1, fsdp=fsdp)
    c.param_sharding = "fsdp" if fsdp > 1 else "replicate"
    return c


def num_visible(m, mask_ratio: float | None = None, strategy: str | None = None) -> int:
    """Visible tokens per clip of model config `m` (its own mask ratio and strategy unless given)."""
    return masking.num_visible(strategy or m.mask_strategy, token_grid(m),
                               m.mask_ratio if mask_ratio is None else mask_ratio)


def median_ms(fn, iters: int, warmup: int = 1) -> float:
    """Median wall milliseconds of `iters` calls of fn() (which must block until its work is done),
    after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def block_macs(n: int, d: int, mlp_ratio: float = 4.0) -> float:
    """Multiply-adds of one ViT block on n tokens of width d (qkv + proj 4nd^2, mlp 2*r*nd^2, attention 2n^2d)."""
    return (4 + 2 * mlp_ratio) * n * d * d + 2 * n * n * d


def train_flops_per_clip(m, num_visible: int) -> float:
    """~6x the forward multiply-adds (2 forward + 4 backward FLOPs per MAC), REFERENCE.md's model, with
    the patch embedding counted on the visible patches only: our encoder gathers them before embedding,
    where the reference embeds all L (REFERENCE.md's 0.28 / 0.49 / 0.81 TFLOP and 7.7x count it so;
    here 0.267 / 0.476 / 0.790 and 7.91x for ViT-B / L / H at 16x224, mask 0.9)."""
    t, p = m.t_patch_size, m.patch_size
    grid = math.prod(token_grid(m))  # tokens per clip
    cls = int(m.cls_embed)
    e, d = m.embed_dim, m.decoder_embed_dim
    u = t * m.pred_t_dim // m.num_frames
    macs = num_visible * 3 * t * p * p * e  # patch embed on the visible patches
    macs += m.depth * block_macs(num_visible + cls, e, m.mlp_ratio)
    macs += num_visible * e * d  # decoder_embed
    macs += m.decoder_depth * block_macs(grid + cls, d, m.mlp_ratio)
    macs += grid * d * u * p * p * 3  # prediction head
    return 6.0 * macs


def prepare_step(config, seed: int = 0):
    """(compiled step, state, batch, compile seconds, memory analysis) on a synthetic uint8 batch."""
    mesh = shd.make_mesh(config.mesh)
    tx, schedule = optim.make_optimizer(config, config_lib.schedule_steps(config), config.warmup_steps)
    graphdef, state, state_sh = step_lib.create_state(
        lambda r: MaskedAutoencoder(rngs=r, **config.model.to_dict()), tx, mesh, config)
    train_step = step_lib.make_pretrain_step(graphdef, tx, schedule, mesh, config, state_sh)
    m = config.model
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 256, (1, config.batch_size, m.num_frames, m.img_size, m.img_size, 3), np.uint8)
    batch = {"video": jax.device_put(video, shd.batch_sharding(mesh, 6))}
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    return compiled, state, batch, compile_s, compiled.memory_analysis()


class StepTimer:
    """A compiled step and its (donated) state: `warm(n)` runs n steps, `time(steps)` returns
    seconds per step over `steps` steps. Several timers can be interleaved in one process."""

    def __init__(self, config, seed: int = 0):
        self.compiled, self.state, self.batch, self.compile_s, self.memory = prepare_step(config, seed)
        self.cpu_s, self.minflt = [], []

    def _run(self, n: int):
        metrics = None
        for _ in range(n):
            self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(metrics)

    def warm(self, n: int = 2):
        self._run(n)

    def time(self, steps: int) -> float:
        """Wall seconds per step; also appends this process's CPU seconds (user + system) and minor
        page faults per step to self.cpu_s / self.minflt (a load-independent view of the cost)."""
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        self._run(steps)
        wall = (time.perf_counter() - t0) / steps
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu_s.append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / steps)
        self.minflt.append((r1.ru_minflt - r0.ru_minflt) / steps)
        return wall


def time_steps(config, steps: int = 10, warmup: int = 2, repeats: int = 3, seed: int = 0):
    """(seconds per step of each of `repeats` timings of `steps` steps, after compile + warmup; the
    StepTimer, which holds compile time, memory analysis and CPU seconds / page faults per timing)."""
    timer = StepTimer(config, seed)
    timer.warm(warmup)
    return [timer.time(steps) for _ in range(repeats)], timer


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The host CPU as the results should name it: model, widest x86 vector ISA, cores this process
    may use, per-core L2. CPU numbers here move with the machine (on the project's Intel AVX-512
    and AMD machines the ratio to the PyTorch reference differed by 30%), so every CPU result says
    which one it came from."""
    first = {}  # the first processor's fields
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                first.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model, flags = first.get("model name", "unknown"), set(first.get("flags", "").split())
    if "cpu family" in first:  # VMs often mask the name ("AMD EPYC"); family/model tell the generation
        model += f" (family {first['cpu family']}, model {first.get('model', '?')})"
    isa = next((name for name in ("amx_tile", "avx512f", "avx2", "avx") if name in flags), "unknown")
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    l2 = layers.l2_cache_bytes()
    return {"model": model, "isa": isa, "cores": cores, "l2_kib_per_core": l2 // 1024 if l2 else None}


def peak_tflops(given: float) -> float | None:
    if given > 0:
        return given
    kind = jax.devices()[0].device_kind
    for name, value in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return value * jax.device_count()
    return None
