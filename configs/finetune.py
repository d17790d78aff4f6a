"""MAE-ST fine-tuning (classification) with the paper's recipe: `--config=configs/finetune.py:vit_l,k400`.

arg: a model size (vit_b, vit_l, vit_h) and optionally a dataset (k400, ssv2, synthetic), comma-separated;
or 'demo': the demo's tiny model on synthetic labelled videos (minutes on 2 CPU cores). Set
`--config.init_from=WORKDIR_OR_PARAM_DIR` to start from pre-trained weights (empty: from scratch).
Numbers from REFERENCE.md (mae_st FINETUNE.md and PySlowFast configs).
"""

import importlib.util
import pathlib

from mae_st_jax import config_lib
from mae_st_jax.models.mae import model_kwargs

DATASETS = {  # videos in the training list; real data validates on all of data.eval_path
    "k400": dict(num_videos=240_436, num_eval_videos=0, num_classes=400),
    "ssv2": dict(num_videos=168_913, num_eval_videos=0, num_classes=174),
    "synthetic": dict(num_videos=4096, num_eval_videos=512, num_classes=8),
}
# size: (layer decay, drop path, dropout, epochs, blr). lr = blr * batch_size / 256 (repeat_aug clips
# counted), so at batch 512: B 6e-4, L 4.8e-3 (mae_st's blr; PySlowFast's L uses lr 3e-4), H 3e-4.
RECIPES = {
    "vit_b": (0.65, 0.1, 0.3, 75, 3e-4),
    "vit_l": (0.75, 0.2, 0.3, 50, 2.4e-3),
    "vit_h": (0.8, 0.2, 0.5, 75, 1.5e-4),
}


def _finetune_defaults(c):
    """What every size shares: AdamW (0.9, 0.999), wd 0.05 (not on pos-embeds/cls), lr = blr *
    clips / 256 with repeat_aug counted, 5 warmup epochs, cosine to 1e-6, clip 5.0, mixup 0.8,
    cutmix 1.0, label smoothing 0.1."""
    c.mode = "finetune"
    c.optim.update(b1=0.9, b2=0.999, weight_decay=0.05, decay_tokens=False, lr_counts_repeat_aug=True,
                   min_lr=1e-6, clip_grad=5.0)
    c.finetune.update(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=1.0, switch_prob=0.5, label_smoothing=0.1,
                      head_init_std=2e-5)
    c.warmup_epochs = 5.0
    return c


def demo_config():
    """The demo's tiny model (configs/demo.py) classifying synthetic videos; ~4 minutes on 2 CPU cores.

    Regularisation is off: at this scale the paper's settings (head init std 2e-5, layer decay 0.75,
    drop path 0.1, label smoothing 0.1, weight decay 0.05) keep the train loss at ln 4 for 300 steps,
    from pre-trained weights and from scratch alike (README, issue 5)."""
    spec = importlib.util.spec_from_file_location("configs_demo", pathlib.Path(__file__).with_name("demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    c = _finetune_defaults(demo.get_config())
    # the demo's videos (16 shape x direction classes), labelled by shape kind: 4 classes
    c.data.update(flip=False, num_eval_videos=1024, synthetic_classes=16, synthetic_label="shape", num_classes=4)
    c.finetune.update(mixup_prob=0.0, rand_augment="")  # no Mixup/CutMix or RandAugment
    c.finetune.update(head_init_std=0.02, layer_decay=1.0, drop_path_rate=0.0, dropout_rate=0.0,
                      label_smoothing=0.0)
    c.batch_size = 32  # 16 videos x repeat_aug 2
    c.total_steps = 300
    c.schedule_steps = 0
    c.warmup_steps = 15
    c.optim.update(lr=1e-3, blr=0.0, weight_decay=0.0)
    c.eval_every_steps = 50
    c.eval_batch_size = 64
    c.log_every_steps = 25
    c.checkpoint_every_steps = 100
    c.write_reconstruction = False
    return c


def get_config(arg: str = "vit_l,k400"):
    if (arg or "").strip() == "demo":
        return demo_config()
    tokens = [t for t in (arg or "vit_l,k400").split(",") if t]
    sizes = [t for t in tokens if t in RECIPES]
    datasets = [t for t in tokens if t in DATASETS]
    if len(sizes) != 1 or len(datasets) > 1 or len(sizes) + len(datasets) != len(tokens):
        raise ValueError(f"configs/finetune.py:{arg}: give 'demo', or one model size {sorted(RECIPES)} and at "
                         f"most one dataset {sorted(DATASETS)}")
    c = _finetune_defaults(config_lib.base_config())
    c.model.update(model_kwargs(sizes[0]), num_frames=16, img_size=224, t_patch_size=2, sep_pos_embed=True,
                   cls_embed=True)
    dataset = datasets[0] if datasets else "synthetic"
    # repeat_aug 2 for B and L (mae_st's L command, PySlowFast's B config); PySlowFast's H config samples once
    c.data.update(DATASETS[dataset], sampling_rate=4, repeat_aug=1 if sizes[0] == "vit_h" else 2)
    c.data.flip = dataset == "k400"  # SSv2 labels and our synthetic classes depend on left/right
    if dataset != "synthetic":
        c.data.source = "tfrecord"
        c.data.path = f"gs://YOUR_BUCKET/{dataset}/train-*.tfrecord"
        c.data.eval_path = f"gs://YOUR_BUCKET/{dataset}/val-*.tfrecord"
        c.data.crop_area = (0.08, 1.0)  # fine-tuning's RandomResizedCrop area range (pre-training: 0.5-1)
    decay, drop_path, dropout, epochs, blr = RECIPES[sizes[0]]
    c.finetune.update(layer_decay=decay, drop_path_rate=drop_path, dropout_rate=dropout)
    c.optim.update(lr=0.0, blr=blr)
    c.num_epochs = epochs
    c.batch_size = 512
    c.eval_every_steps = config_lib.steps_per_epoch(c)  # per-epoch validation, as mae_st
    c.eval_batch_size = 512
    if sizes[0] in ("vit_l", "vit_h"):
        c.param_sharding = "fsdp"
        c.model.update(dtype="bfloat16", remat="dots_no_batch")
    return c


def sweep():
    """Demo-scale points (with `:demo`): layer decay x Mixup/CutMix on (prob 1) or off (prob 0)."""
    return [{"finetune.layer_decay": d, "finetune.mixup_prob": p} for d in (0.65, 0.75, 1.0) for p in (0.0, 1.0)]
