"""Median pre-training step time of the PyTorch reference (facebookresearch/mae_st), for comparison.

python benchmarks/torch_reference.py --ref_dir=/path/to/mae_st --shim_dir=/path/to/shim \
    --size=vit_b --frames=16 --img=112 --batch=4 --mask_ratio=0.9 --steps=3 --repeats=3 --threads=2

Runs the reference's own model code (models_mae.py, util/video_vit.py, util/lr_sched.py from a
checkout of mae_st kept outside this repository) through the training step of its
engine_pretrain.train_one_epoch with PRETRAIN.md's recipe: decoder 512 x 4 (16 heads), t_patch 2,
pred_t_dim = frames / 2, norm_pix_loss, sep_pos_embed and cls_embed on, fp32 (no autocast, the
GradScaler disabled), per-iteration lr, AdamW (multi-tensor) betas (0.9, 0.95) with the
reference's weight-decay groups, global-norm gradient clipping 0.02. Nothing from this
repository is imported but benchmarks/paired.py (standard library only, for --serve), so it runs
with torch alone. Prints JSON with the same keys as benchmarks/train_step.py (median_step_s,
clips_per_s, ...); with --serve, times steps on request instead, as train_step.py --serve does.

The reference imports timm (which imports torchvision at import time) and iopath; --shim_dir
names a folder that provides `timm.models.layers` / `timm.models.vision_transformer`
(to_2tuple, DropPath, Mlp with timm's semantics) and `iopath.common.file_io.g_pathmgr`, put
first on sys.path. With a real timm + torchvision + iopath installed it is not needed.
"""

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
import types

REF_MODELS = {"vit_b": "mae_vit_base_patch16", "vit_l": "mae_vit_large_patch16", "vit_h": "mae_vit_huge_patch14"}
SIZES = {"vit_b": (768, 12, 16), "vit_l": (1024, 24, 16), "vit_h": (1280, 32, 14)}  # width, depth, patch


def import_reference(ref_dir: str, shim_dir: str):
    """The reference's models_mae and util.lr_sched, imported as the package `mae_st` (its own imports)."""
    if shim_dir:
        sys.path.insert(0, os.path.abspath(shim_dir))
    ref_dir = os.path.abspath(ref_dir)
    if not os.path.isfile(os.path.join(ref_dir, "models_mae.py")):
        raise SystemExit(f"--ref_dir={ref_dir} has no models_mae.py: point it at a mae_st checkout")
    pkg = types.ModuleType("mae_st")  # the reference imports itself as `mae_st.*`, whatever the folder is called
    pkg.__path__ = [ref_dir]
    sys.modules["mae_st"] = pkg
    from mae_st import models_mae  # noqa: E402
    from mae_st.util import lr_sched  # noqa: E402
    return models_mae, lr_sched


def add_weight_decay(model, weight_decay, bias_wd=False):
    """mae_st util/misc.add_weight_decay (misc.py itself imports Meta-internal torch.fb modules)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (not bias_wd) and len(param.shape) == 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def train_flops_per_clip(a, visible: int) -> float:
    """Same model as benchmarks/common.train_flops_per_clip (6 x forward multiply-adds)."""
    e, depth, p = SIZES[a.size]
    t, d, cls = 2, a.decoder_embed_dim, 1
    grid = (a.frames // t) * (a.img // p) ** 2
    u = t * (a.frames // 2) // a.frames
    block = lambda n, w: 12 * n * w * w + 2 * n * n * w
    macs = visible * 3 * t * p * p * e + depth * block(visible + cls, e) + visible * e * d
    macs += a.decoder_depth * block(grid + cls, d) + grid * d * u * p * p * 3
    return 6.0 * macs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref_dir", required=True, help="a checkout of facebookresearch/mae_st")
    ap.add_argument("--shim_dir", default="", help="folder with timm/iopath stand-ins, put first on sys.path")
    ap.add_argument("--size", default="vit_b", choices=sorted(REF_MODELS))
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--img", type=int, default=112)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--mask_ratio", type=float, default=0.9)
    ap.add_argument("--decoder_embed_dim", type=int, default=512)
    ap.add_argument("--decoder_depth", type=int, default=4)
    ap.add_argument("--decoder_num_heads", type=int, default=16)
    ap.add_argument("--clip_grad", type=float, default=0.02, help="PRETRAIN.md's value; <= 0: none")
    ap.add_argument("--blr", type=float, default=1.6e-3)
    ap.add_argument("--weight_decay", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 = torch's default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve", action="store_true", help="after the warm-up steps, time steps on request "
                                                         "(benchmarks/paired.py), for compare_torch.py --paired")
    a = ap.parse_args()

    import torch
    import torch.optim._multi_tensor  # noqa: F401  (main_pretrain's AdamW: AdamW with foreach=True)

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    models_mae, lr_sched = import_reference(a.ref_dir, a.shim_dir)
    model = models_mae.__dict__[REF_MODELS[a.size]](
        num_frames=a.frames, t_patch_size=2, img_size=a.img, pred_t_dim=a.frames // 2, norm_pix_loss=True,
        decoder_embed_dim=a.decoder_embed_dim, decoder_depth=a.decoder_depth,
        decoder_num_heads=a.decoder_num_heads, sep_pos_embed=True, cls_embed=True, trunc_init=False)
    model.train(True)
    sched = types.SimpleNamespace(lr=a.blr * a.batch / 256, min_lr=0.0, warmup_epochs=5, epochs=100)
    optimizer = torch.optim._multi_tensor.AdamW(add_weight_decay(model, a.weight_decay), lr=sched.lr,
                                                betas=(0.9, 0.95))
    # the data loader's output: normalised float clips [N, C, T, H, W]
    samples = torch.randn(a.batch, 3, a.frames, a.img, a.img, dtype=torch.float32)
    steps_per_epoch = 1000

    def train_step(i):  # engine_pretrain.train_one_epoch, accum_iter 1, fp32 (NativeScaler disabled)
        lr_sched.adjust_learning_rate(optimizer, i / steps_per_epoch, sched)
        loss, _, _ = model(samples, mask_ratio=a.mask_ratio)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise SystemExit(f"loss is {loss_value}")
        loss.backward()
        if a.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip_grad)
        else:
            torch.norm(torch.stack([torch.norm(p.grad.detach(), 2.0) for p in model.parameters()
                                    if p.grad is not None]), 2.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss_value

    step = 0
    for _ in range(a.warmup):
        train_step(step)
        step += 1

    def timed(n):
        """Wall seconds, CPU seconds and minor page faults per step over n steps."""
        nonlocal step
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(n):
            train_step(step)
            step += 1
        wall = (time.perf_counter() - t0) / n
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        return wall, (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / n, (r1.ru_minflt - r0.ru_minflt) / n

    torch_build = {"cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
                   "mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available()}
    if a.serve:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import paired

        def time_steps(n):
            step_s, cpu, flt = timed(n)
            return {"step_s": step_s, "clips_per_s": a.batch / step_s, "cpu_s_per_step": cpu, "minflt_per_step": flt}

        paired.serve(time_steps, {"torch_build": torch_build, "torch_threads": torch.get_num_threads()})
        return
    times, cpu_s, minflt = [], [], []
    for _ in range(a.repeats):
        wall, cpu, flt = timed(a.steps)
        times.append(wall)
        cpu_s.append(cpu)
        minflt.append(flt)
    step_s = statistics.median(times)
    grid = (a.frames // 2) * (a.img // SIZES[a.size][2]) ** 2
    visible = int(grid * (1 - a.mask_ratio))
    flops = train_flops_per_clip(a, visible)
    result = {"device": "cpu (torch %s)" % torch.__version__, "impl": "pytorch mae_st reference",
              "torch_threads": torch.get_num_threads(), **vars(a), "dtype": "float32",
              "median_step_s": step_s, "clips_per_s": a.batch / step_s, "step_times_s": times,
              "cpu_s_per_step": statistics.median(cpu_s), "minflt_per_step": statistics.median(minflt),
              "train_tflop_per_clip": flops / 1e12, "achieved_tflops": flops * a.batch / step_s / 1e12,
              "num_params": sum(p.numel() for p in model.parameters()),
              # which kernels the matmuls ran: on the project's machines the ratio to ours moved with them
              "torch_build": torch_build}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
