"""Demo: a tiny MAE-ST pre-trained on synthetic moving-shape videos; a few minutes on 2 CPU cores."""

from mae_st_jax import config_lib


def get_config(arg: str = ""):
    del arg
    c = config_lib.base_config()
    c.model.update(embed_dim=128, depth=4, num_heads=4, patch_size=8, img_size=48, num_frames=8,
                   t_patch_size=2, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                   pred_t_dim=4, mask_ratio=0.9, norm_pix_loss=False)
    # all 16 (shape, direction) classes of the synthetic source, with shapes big enough for 8x8 patches
    c.data.update(num_videos=2048, num_classes=16, video_frames=48, sampling_rate=2, repeat_aug=2,
                  num_workers=2, synthetic_radius=(0.12, 0.22), synthetic_speed=(0.02, 0.05))
    c.batch_size = 32
    c.total_steps = 300
    # the cosine spans 600 steps, so `--config.total_steps=600` later continues this run
    # exactly as one uninterrupted 600-step run would have gone
    c.schedule_steps = 600
    c.warmup_steps = 30
    c.optim.update(blr=1.5e-3 * 256 / 16, clip_grad=1.0)  # lr 1.5e-3 at 16 videos per step
    c.log_every_steps = 25
    c.checkpoint_every_steps = 100
    return c


def sweep():
    """Points for launch/sweep.py: mask ratio and strategy, as the paper's ablation."""
    return [{"model.mask_ratio": r, "model.mask_strategy": s}
            for s in ("random", "tube") for r in (0.75, 0.9)]
