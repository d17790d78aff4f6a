"""Reference cases from PySlowFast's MaskMViT (MAE-ST pre-training) and fine-tuned ViT (MViT), for
benchmarks/pyslowfast_parity.py.

Runs the real, unmodified SlowFast MaskMViT forward (CPU, float64) on a tiny ViT (width 64, 2 + 2 blocks,
4x32x32 clips, mask ratio 0.75, decoder width D) with fixed weights, noise and video, and saves them with
its predictions, targets and loss to $SF_OUT/case_{D}.pt; `classifier` does the same for the fine-tuned
ViT (7 classes, its logits) into $SF_OUT/classifier_case.pt. Run it outside this repository, with SlowFast's
sources exported from a clone (nothing of SlowFast is committed here):

  git -C SLOWFAST_CLONE archive HEAD slowfast configs tools setup.py | tar -x -C /tmp/sf/src
  pip install --target /tmp/sf/site --no-deps fvcore iopath yacs tabulate portalocker
  SF_SRC=/tmp/sf/src SF_MIRROR=SLOWFAST_CLONE SF_OUT=/tmp/sf PYTHONPATH=/tmp/sf/src:/tmp/sf/site \
      python benchmarks/pyslowfast_case.py [64 128 classifier]

Third-party packages the MAE forward does not use (pytorchvideo, detectron2, torchvision,
slowfast.datasets) are stubbed; the model sources are checked to be the clone's HEAD.
"""
import hashlib
import os
import subprocess
import sys
import types

import torch

SRC = os.environ.get("SF_SRC", "/tmp/sf/src")
MIRROR = os.environ.get("SF_MIRROR", "")  # a SlowFast git clone: the sources are checked against its HEAD
OUT_DIR = os.environ.get("SF_OUT", "/tmp/sf")
CFG_FILE = os.path.join(SRC, "configs/masked_ssl/k400_VIT_L_16x4_MAE_PT.yaml")


# --------------------------------------------------------------------------
# 1. Stubs for heavy optional deps (never exercised by the MAE forward).
# --------------------------------------------------------------------------
class _StubModule(types.ModuleType):
    """Module whose every attribute is a dummy class that refuses to be built."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def _init(self_, *a, **k):
            raise RuntimeError(f"stubbed symbol {self.__name__}.{name} was used")

        cls = type(name, (), {"__init__": _init})
        setattr(self, name, cls)
        return cls


STUBBED = [
    "pytorchvideo",
    "pytorchvideo.layers",
    "pytorchvideo.layers.batch_norm",  # NaiveSyncBatchNorm1d/3d (BN only)
    "pytorchvideo.layers.distributed",  # dist helpers (utils/distributed.py)
    "pytorchvideo.layers.swish",  # Swish (X3D only)
    "pytorchvideo.losses",
    "pytorchvideo.losses.soft_target_cross_entropy",  # unused loss
    "detectron2",
    "detectron2.layers",  # ROIAlign (detection heads only)
    "torchvision",
    "torchvision.io",  # utils/misc.py (video writing)
    "torchvision.utils",  # utils/misc.py make_grid (visualisation)
    "torchvision.transforms",
    "slowfast.datasets",  # data pipeline, pulled in by utils/misc.py
    "slowfast.datasets.utils",
]


def _install_stubs():
    for name in STUBBED:
        sys.modules[name] = _StubModule(name)
    for name in STUBBED:  # wire children as attributes of parents
        if "." in name:
            parent, child = name.rsplit(".", 1)
            if parent in STUBBED:
                setattr(sys.modules[parent], child, sys.modules[name])


def _check_unmodified():
    """Verify model source files are byte-identical to the mirror's HEAD."""
    files = [
        "slowfast/models/masked.py",
        "slowfast/models/attention.py",
        "slowfast/models/head_helper.py",
        "slowfast/models/video_model_builder.py",
        "slowfast/models/stem_helper.py",
        "slowfast/models/common.py",
        "slowfast/models/utils.py",
        "slowfast/models/losses.py",
        "slowfast/config/defaults.py",
        "configs/masked_ssl/k400_VIT_L_16x4_MAE_PT.yaml",
    ]
    head = None
    try:
        head = subprocess.check_output(
            ["git", "-C", MIRROR, "rev-parse", "HEAD"], text=True
        ).strip()
        for f in files:
            want = subprocess.check_output(
                ["git", "-C", MIRROR, "rev-parse", f"HEAD:{f}"], text=True
            ).strip()
            data = open(os.path.join(SRC, f), "rb").read()
            got = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            assert got == want, f"{f} differs from SlowFast HEAD"
    except (OSError, subprocess.CalledProcessError) as e:  # mirror not available
        print("WARNING: could not verify sources against mirror:", e)
    return head


_install_stubs()
SLOWFAST_COMMIT = _check_unmodified()

from slowfast.config.defaults import assert_and_infer_cfg, get_cfg  # noqa: E402
import slowfast.models.masked as sf_masked  # noqa: E402
from slowfast.models import build_model  # noqa: E402
from slowfast.models import losses as sf_losses  # noqa: E402


# --------------------------------------------------------------------------
# 2. Config
# --------------------------------------------------------------------------
def make_cfg(dec_dim):
    cfg = get_cfg()
    cfg.merge_from_file(CFG_FILE)
    cfg.merge_from_list(
        [
            "MVIT.EMBED_DIM", 64,
            "MVIT.NUM_HEADS", 4,
            "MVIT.DEPTH", 2,
            "MASK.PRETRAIN_DEPTH", [1],
            "MASK.DECODER_EMBED_DIM", dec_dim,
            "MASK.DECODER_DEPTH", 2,
            "DATA.NUM_FRAMES", 4,
            "DATA.TRAIN_CROP_SIZE", 32,
            "DATA.TEST_CROP_SIZE", 32,
            "AUG.MASK_RATIO", 0.75,
            "NUM_GPUS", 0,
            "TRAIN.BATCH_SIZE", 2,
            "TEST.BATCH_SIZE", 2,
            "DATA_LOADER.NUM_WORKERS", 0,
        ]
    )
    cfg = assert_and_infer_cfg(cfg)
    # sanity: the settings the brief asks to keep from the yaml
    assert tuple(cfg.MVIT.PATCH_KERNEL) == (2, 16, 16)
    assert tuple(cfg.MVIT.PATCH_STRIDE) == (2, 16, 16)
    assert tuple(cfg.MVIT.PATCH_PADDING) == (0, 0, 0)
    assert cfg.MVIT.SEP_POS_EMBED and cfg.MVIT.CLS_EMBED_ON
    assert cfg.MASK.MAE_ON and cfg.MASK.MAE_RND_MASK and cfg.MASK.ENABLE
    assert cfg.MASK.HEAD_TYPE == "separate_xformer"
    assert cfg.MODEL.MODEL_NAME == "MaskMViT" and cfg.MODEL.LOSS_FUNC == "multi_mse"
    return cfg


# --------------------------------------------------------------------------
# 3. Parameter randomisation
# --------------------------------------------------------------------------
def randomise(model):
    g = torch.Generator().manual_seed(0)
    ln_params = set()
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            ln_params.add(id(m.weight))
            ln_params.add(id(m.bias))
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if id(p) in ln_params:
                val = (1.0 + 0.3 * n) if name.endswith("weight") else 0.3 * n
            elif p.dim() >= 2 and name.endswith("weight"):
                fan_in = p[0].numel()  # Linear: in_features, Conv3d: Cin*kt*kh*kw
                val = n * (1.5 / fan_in**0.5)
            elif name.endswith("bias"):
                val = 0.3 * n
            else:  # cls_token, pos embeds, mask_token
                val = 0.7 * n
            p.copy_(val.to(p.dtype))


# --------------------------------------------------------------------------
# 4. Fixed masking noise: patch torch.rand only while the forward runs
# --------------------------------------------------------------------------
class FixedRand:
    def __init__(self, noise):
        self.noise = noise
        self.calls = []

    def __enter__(self):
        self._orig = torch.rand

        def fake_rand(*size, **kw):
            shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else tuple(size)
            self.calls.append(shape)
            assert shape == tuple(self.noise.shape), (shape, self.noise.shape)
            return self.noise.clone().to(kw.get("device") or "cpu")

        torch.rand = fake_rand  # masked.py does `torch.rand(N, L, device=...)`
        return self

    def __exit__(self, *exc):
        torch.rand = self._orig


def run_case(dec_dim, B=2, dtype=torch.float64):
    cfg = make_cfg(dec_dim)
    torch.manual_seed(0)
    model = build_model(cfg)  # == MODEL_REGISTRY.get("MaskMViT")(cfg) on CPU
    assert type(model) is sf_masked.MaskMViT
    model = model.to(dtype)
    randomise(model)
    model.eval()

    T, S = cfg.DATA.NUM_FRAMES, cfg.DATA.TRAIN_CROP_SIZE
    pt, ph, pw = cfg.MVIT.PATCH_STRIDE
    L = (T // pt) * (S // ph) * (S // pw)
    g = torch.Generator().manual_seed(1000 + dec_dim)
    video = torch.randn(B, 3, T, S, S, generator=g, dtype=torch.float64).to(dtype)
    noise = torch.rand(B, L, generator=g, dtype=torch.float32)
    len_keep = int(L * (1 - cfg.AUG.MASK_RATIO))
    assert len_keep > 1

    # capture intermediates (hooks are read-only)
    inter = {}

    def hook(name):
        def f(mod, inp, out):
            o = out[0] if isinstance(out, tuple) else out
            inter[name] = o.detach().clone()
        return f

    hs = [
        model.patch_embed.register_forward_hook(hook("patch_embed_out")),
        model.norm.register_forward_hook(hook("encoder_out")),
        model.decoder_embed.register_forward_hook(hook("decoder_embed_out")),
    ]
    for i, blk in enumerate(model.blocks):
        hs.append(blk.register_forward_hook(hook(f"encoder_block{i}_out")))
    for i, blk in enumerate(model.pred_head.transforms[0]):
        hs.append(blk.register_forward_hook(hook(f"pred_head_transform{i}_out")))

    # wrap _mae_random_masking (delegating to the real method) to record its mask
    rec = {}
    orig_masking = model._mae_random_masking

    def recording_masking(x, mask_ratio, mask_in=None):
        out = orig_masking(x, mask_ratio, mask_in)
        rec["mask"], rec["ids_restore"], rec["ids_keep"] = (t.detach().clone() for t in out[1:])
        return out

    model._mae_random_masking = recording_masking

    with torch.no_grad(), FixedRand(noise) as fr:
        pred, labels = model([video])  # forward takes a LIST of pathway tensors
    del model._mae_random_masking
    for h in hs:
        h.remove()
    assert fr.calls == [(B, L)], fr.calls

    loss_fun = sf_losses.get_loss_func(cfg.MODEL.LOSS_FUNC)(reduction="mean")
    loss, multi_loss = loss_fun(pred, labels)  # exactly as tools/train_net.py

    # independent checks on the mask
    ids_shuffle = torch.argsort(noise, dim=1)
    exp_mask = torch.ones(B, L)
    exp_mask.scatter_(1, ids_shuffle[:, :len_keep], 0.0)
    assert torch.equal(exp_mask, rec["mask"])
    n_masked = int(rec["mask"].sum())
    assert pred[0].shape[0] == n_masked == labels[0][0].shape[0]

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dims = dict(B=B, C=3, T=T, H=S, W=S, L=L, len_keep=len_keep,
                patch_dims=list(model.patch_dims))
    notes = (f"SlowFast {SLOWFAST_COMMIT}: MaskMViT via build_model(cfg), eval, {dtype}; pred, labels = "
             f"model([video]) with video [B, C, T, H, W] = {list(video.shape)}; noise [B, L] is what torch.rand "
             f"returned in _mae_random_masking; mask [B, L] 1 = removed; pred[0] and labels[0][0]: the "
             f"{n_masked} masked tokens, batch-major; loss: multi_mse (reduction mean) of pred and labels")

    case = {
        "model_state": sd,
        "cfg": cfg.dump(),
        "video": video,
        "noise": noise,
        "mask": rec["mask"],
        "ids_restore": rec["ids_restore"],
        "ids_keep": rec["ids_keep"],
        "pred": [p.detach() for p in pred],
        "labels": [(lb[0].detach(), lb[1]) for lb in labels],
        "loss": loss.detach(),
        "multi_loss": [m.detach() for m in multi_loss],
        "intermediates": inter,
        "dims": dims,
        "notes": notes,
        "slowfast_commit": SLOWFAST_COMMIT,
    }
    path = os.path.join(OUT_DIR, f"case_{dec_dim}.pt")
    torch.save(case, path)
    print(f"saved {path}: pred {tuple(pred[0].shape)} labels {tuple(labels[0][0].shape)} "
          f"loss {loss.item():.10f} n_masked {n_masked} dtype {pred[0].dtype}")
    return case


def run_classifier_case(B=3, dtype=torch.float64):
    """PySlowFast's fine-tuned ViT (MViT with configs/masked_ssl/k400_VIT_L_16x4_FT.yaml, shrunk): its logits
    before the eval-mode softmax (a hook on head.projection) on random clips, to classifier_case.pt."""
    from slowfast.models import video_model_builder

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(SRC, "configs/masked_ssl/k400_VIT_L_16x4_FT.yaml"))
    cfg.merge_from_list(["MVIT.EMBED_DIM", 64, "MVIT.NUM_HEADS", 4, "MVIT.DEPTH", 2, "DATA.NUM_FRAMES", 4,
                         "DATA.TRAIN_CROP_SIZE", 32, "DATA.TEST_CROP_SIZE", 32, "MODEL.NUM_CLASSES", 7, "NUM_GPUS", 0,
                         "TRAIN.BATCH_SIZE", B, "TEST.BATCH_SIZE", B, "DATA_LOADER.NUM_WORKERS", 0])
    cfg = assert_and_infer_cfg(cfg)
    assert cfg.MVIT.SEP_POS_EMBED and cfg.MVIT.CLS_EMBED_ON and cfg.MVIT.USE_MEAN_POOLING
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model) is video_model_builder.MViT
    model = model.to(dtype)
    randomise(model)
    model.eval()
    T, S = cfg.DATA.NUM_FRAMES, cfg.DATA.TRAIN_CROP_SIZE
    video = torch.randn(B, 3, T, S, S, generator=torch.Generator().manual_seed(2024), dtype=torch.float64).to(dtype)
    seen = {}
    hook = model.head.projection.register_forward_hook(lambda mod, inp, out: seen.update(logits=out.detach()))
    with torch.no_grad():
        out = model([video])
    hook.remove()
    assert torch.allclose(out, torch.softmax(seen["logits"], dim=1))  # eval: the head's softmax
    case = {"model_state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "cfg": cfg.dump(),
            "video": video, "logits": seen["logits"], "probs": out.detach(),
            "notes": f"SlowFast {SLOWFAST_COMMIT}: MViT via build_model(cfg), eval, {dtype}; out = model([video]) "
                     f"with video [B, C, T, H, W] = {list(video.shape)}; logits: head.projection's output"}
    path = os.path.join(OUT_DIR, "classifier_case.pt")
    torch.save(case, path)
    print(f"saved {path}: logits {tuple(seen['logits'].shape)} dtype {seen['logits'].dtype}")
    return case


if __name__ == "__main__":
    torch.set_num_threads(2)
    for arg in sys.argv[1:] or ["64", "128", "classifier"]:
        run_classifier_case() if arg == "classifier" else run_case(int(arg))
