"""MAE-ST pre-training with the paper's recipe: `--config=configs/pretrain.py:vit_l,k400`.

arg: comma-separated tokens; a model size (vit_s, vit_b, vit_l, vit_h, vit_h14) and optionally
a dataset (k400, k600, k700, ssv2, synthetic). Numbers from REFERENCE.md (mae_st PRETRAIN.md).
"""

from mae_st_jax import config_lib
from mae_st_jax.models.mae import ALIASES, model_kwargs

DATASETS = {  # videos in the training list (used for epochs -> steps)
    "k400": dict(num_videos=240_436, num_classes=400),
    "k600": dict(num_videos=392_000, num_classes=600),
    "k700": dict(num_videos=545_317, num_classes=700),
    "ssv2": dict(num_videos=168_913, num_classes=174),
    "synthetic": dict(num_videos=4096, num_classes=8),
}


def get_config(arg: str = "vit_l,k400"):
    tokens = [t for t in (arg or "vit_l,k400").split(",") if t]
    sizes = [t for t in tokens if t not in DATASETS]
    datasets = [t for t in tokens if t in DATASETS]
    if len(sizes) != 1 or len(datasets) > 1:
        raise ValueError(f"configs/pretrain.py:{arg}: give one model size (vit_s, vit_b, vit_l, vit_h, vit_h14) "
                         f"and at most one dataset {sorted(DATASETS)}")
    c = config_lib.base_config()
    c.model.update(model_kwargs(sizes[0].replace("vit_h14", "h14")))
    dataset = datasets[0] if datasets else "synthetic"
    c.data.update(DATASETS[dataset])
    if dataset != "synthetic":
        c.data.source = "tfrecord"
        c.data.path = f"gs://YOUR_BUCKET/{dataset}/train-*.tfrecord"
    # recipe: 16 frames at rate 4, 2x16x16 patches, 90% random masking, norm-pix loss,
    # decoder 512 x 4, AdamW (0.9, 0.95), wd 0.05, blr 1.6e-3, 400 epochs x repeat_aug 4,
    # 5 warmup epochs then half-cosine to 0, clip 0.02, 512 clips per step.
    c.model.update(num_frames=16, img_size=224, t_patch_size=2,
                   pred_t_dim=8, mask_ratio=0.9, norm_pix_loss=True, sep_pos_embed=True, cls_embed=True,
                   decoder_embed_dim=512, decoder_depth=4, decoder_num_heads=16)
    c.data.update(sampling_rate=4, repeat_aug=4)
    c.batch_size = 512
    c.num_epochs = 400
    c.warmup_epochs = 5.0
    c.optim.update(blr=1.6e-3, min_lr=0.0, b1=0.9, b2=0.95, weight_decay=0.05, clip_grad=0.02)
    if ALIASES.get(sizes[0], sizes[0]) in ("l16", "h16", "h14", "vit_h14"):
        # on accelerators: bf16 compute (params and optimizer state stay fp32; the reference
        # trains in fp32: --config.model.dtype=float32 for that), FSDP and remat
        c.param_sharding = "fsdp"
        c.model.update(dtype="bfloat16", remat="dots_no_batch")
    return c


def sweep():
    """The paper's mask-ratio and mask-strategy ablations (Table 2a); one run per point."""
    points = [{"model.mask_ratio": r} for r in (0.5, 0.75, 0.9, 0.95)]
    points += [{"model.mask_strategy": s, "model.mask_ratio": 0.9} for s in ("tube", "block")]
    points += [{"model.mask_strategy": "frame", "model.mask_ratio": 0.75}]
    return points
