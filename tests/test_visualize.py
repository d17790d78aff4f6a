"""Reconstruction CLI (mae_st_jax.visualize): GIF and PNG layout, exact visible patches, norm-pix inverse, errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mae_st_jax import visualize
from mae_st_jax.data import fake_videos
from mae_st_jax.models import MaskedAutoencoder
from mae_st_jax.models.mae import norm_pix_target
from mae_st_jax.train import checkpoint

# 4 frames of 32x32, patches 2x8x8: a 2x4x4 token grid; the decoder predicts pred_t_dim=2 frames
MODEL = dict(img_size=32, patch_size=8, num_frames=4, t_patch_size=2, embed_dim=32, depth=1, num_heads=2,
             decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, pred_t_dim=2, norm_pix_loss=True)
PANEL = 32 * visualize.panel_scale(32)


def _params():
    return jax.device_get(nnx.to_pure_dict(nnx.split(MaskedAutoencoder(rngs=nnx.Rngs(0), **MODEL), nnx.Param)[1]))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A parameter directory (params/ + model.json) of a freshly initialised tiny MAE-ST."""
    path = tmp_path_factory.mktemp("ckpt")
    checkpoint.save_params(str(path), _params(), MODEL)
    return str(path)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """20 frames of 40x56 moving shapes, H.264 through PyAV (not square: the centre crop runs)."""
    path = str(tmp_path_factory.mktemp("video") / "shapes.mp4")
    fake_videos.write_video(path, fake_videos.shape_frames(20, 40, 56))
    return path


def cli(*args):
    return visualize.main(["visualize"] + list(args))


def _error(*args) -> str:
    with pytest.raises(SystemExit) as info:
        cli(*args)
    message = str(info.value.code)
    assert message.startswith("visualize: ") and "\n" not in message, message
    return message


def test_gif_one_frame_per_predicted_frame_one_row_per_ratio(ckpt, video, tmp_path):
    sizes = {}
    for ratios in ("0.5", "0.5,0.75,0.9"):
        out = str(tmp_path / f"{ratios}.gif")
        result = cli(f"--init_from={ckpt}", f"--video={video}", f"--output={out}", f"--mask_ratio={ratios}")
        assert len(result.reconstructions) == len(ratios.split(","))
        with Image.open(out) as gif:
            assert gif.n_frames == MODEL["pred_t_dim"]
            sizes[ratios] = gif.size
            frames = []
            for k in range(gif.n_frames):
                gif.seek(k)
                frames.append(np.asarray(gif.convert("RGB")))
            assert not np.array_equal(frames[0], frames[1])
    m, g = visualize.MARGIN, visualize.GAP
    assert sizes["0.5"][0] == sizes["0.5,0.75,0.9"][0] == 2 * m + visualize.LABEL_W + 3 * PANEL + 2 * g
    assert sizes["0.5,0.75,0.9"][1] - sizes["0.5"][1] == 2 * (PANEL + g)  # two more row groups


def test_png_grid_keeps_visible_patches_exact(ckpt, video, tmp_path):
    out = str(tmp_path / "grid.png")
    result = cli(f"--init_from={ckpt}", f"--video={video}", f"--output={out}", "--mask_ratio=0.5,0.75,0.9",
                 "--seed=3")
    recs = result.reconstructions
    assert [r.mask_ratio for r in recs] == [0.5, 0.75, 0.9]
    assert [r.num_visible for r in recs] == [16, 8, 3]  # int(32 * (1 - r))
    assert [int((~r.mask[:, ::8, ::8]).sum()) for r in recs] == [16, 8, 3]  # one pixel per 8x8 patch, u=1
    for small, large in zip(recs, recs[1:]):  # the same noise: a larger ratio masks a superset
        assert np.all(large.mask[small.mask])
    image = np.asarray(Image.open(out).convert("RGB"))
    assert {g for g, _, _ in result.boxes} == {0, 1, 2}  # one row group per ratio
    scale = visualize.panel_scale(32)
    shown = result.frames[list(recs[0].frames)]  # uint8 input at the predicted frames
    for g, rec in enumerate(recs):
        visible = ~rec.mask
        np.testing.assert_array_equal(rec.reconstruction[visible], rec.original[visible])  # normalised space
        assert not np.allclose(rec.reconstruction[rec.mask], rec.original[rec.mask])  # masked: predicted
        for t in range(len(rec.frames)):
            def crop(row):
                top, left, h, w = result.boxes[(g, row, t)]
                return image[top:top + h:scale, left:left + w:scale]  # back to 32x32
            np.testing.assert_array_equal(crop("original"), shown[t])  # the input frame, exactly
            np.testing.assert_array_equal(crop("reconstruction")[visible[t]], shown[t][visible[t]])
            np.testing.assert_array_equal(crop("masked")[visible[t]], shown[t][visible[t]])
            assert np.all(crop("masked")[rec.mask[t]] == visualize.MASK_GREY)


def test_norm_pix_prediction_of_the_target_restores_the_patch():
    rng = np.random.default_rng(0)
    target = jnp.asarray(rng.uniform(-2, 3, (2, 12, 128)) * rng.uniform(0.1, 2, (2, 12, 1)), jnp.float32)
    restored = visualize.unnormalize_patches(norm_pix_target(target), target)
    np.testing.assert_allclose(np.asarray(restored), np.asarray(target), rtol=0, atol=2e-6)
    mask = jnp.asarray(rng.random((2, 12)) < 0.5, jnp.float32)
    pred = jnp.full_like(target, 7.0)
    out = np.asarray(visualize.composite(pred, target, mask))
    m = np.asarray(mask) > 0
    np.testing.assert_array_equal(out[~m], np.asarray(target)[~m])
    assert np.all(out[m] == 7.0)


def test_norm_pix_flag_follows_model_json_and_override(ckpt, video, tmp_path):
    out = str(tmp_path / "a.png")
    auto = cli(f"--init_from={ckpt}", f"--video={video}", f"--output={out}")
    height_norm_pix = Image.open(out).size[1]
    off = cli(f"--init_from={ckpt}", f"--video={video}", f"--output={out}", "--norm_pix_loss=false")
    assert auto.reconstructions[0].norm_pix and not off.reconstructions[0].norm_pix
    assert Image.open(out).size[1] == height_norm_pix - visualize.LINE_H  # no norm-pix caption line
    np.testing.assert_array_equal(auto.reconstructions[0].mask, off.reconstructions[0].mask)


def test_workdir_settings_and_short_video(tmp_path):
    """A training workdir (checkpoints/ + model.json + config.json): its sampling rate is used; a clip
    longer than the video repeats the last frame."""
    workdir = tmp_path / "run"
    mgr = checkpoint.manager(str(workdir), async_save=False)
    checkpoint.save_state(mgr, 2, {"params": _params(), "step": np.int32(2)})
    mgr.wait_until_finished()
    mgr.close()
    (workdir / "model.json").write_text(json.dumps(MODEL))
    (workdir / "config.json").write_text(json.dumps({"data": {"sampling_rate": 2, "target_fps": 30.0}}))
    long_video, short_video = str(tmp_path / "long.mp4"), str(tmp_path / "short.mp4")
    fake_videos.write_video(long_video, fake_videos.shape_frames(30, 32, 32))
    fake_videos.write_video(short_video, fake_videos.shape_frames(5, 32, 32))
    result = cli(f"--init_from={workdir}", f"--video={long_video}", f"--output={tmp_path / 'l.gif'}",
                 "--start_frame=3")
    np.testing.assert_array_equal(result.indices, [3, 5, 7, 10])  # linspace(3, 3 + 2 * 4 - 1, 4), truncated
    result = cli(f"--init_from={workdir}", f"--video={short_video}", f"--output={tmp_path / 's.gif'}",
                 "--sampling_rate=4")
    np.testing.assert_array_equal(result.indices, [0, 4, 4, 4])  # span 16 > 5 frames: clamped
    np.testing.assert_array_equal(result.frames[1], result.frames[3])


def test_errors_are_one_line(ckpt, video, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4000))
    out = f"--output={tmp_path / 'x.gif'}"
    assert "cannot read video" in _error(f"--init_from={ckpt}", f"--video={corrupt}", out)
    assert "no such file" in _error(f"--init_from={ckpt}", f"--video={tmp_path / 'none.mp4'}", out)
    assert "no such directory" in _error(f"--init_from={tmp_path / 'missing'}", f"--video={video}", out)
    assert "no model.json" in _error(f"--init_from={tmp_path}", f"--video={video}", out)
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "model.json").write_text(json.dumps(dict(MODEL, kind="classifier", num_classes=5)))
    assert "not a pre-training one" in _error(f"--init_from={classifier}", f"--video={video}", out)
    assert "keeps no token" in _error(f"--init_from={ckpt}", f"--video={video}", out, "--mask_ratio=0.9,0.99")
    assert "--mask_strategy=cube" in _error(f"--init_from={ckpt}", f"--video={video}", out, "--mask_strategy=cube")
    assert ".gif or a .png" in _error(f"--init_from={ckpt}", f"--video={video}", f"--output={tmp_path / 'x.jpg'}")
    assert not os.path.exists(tmp_path / "x.gif")


def test_command_line_entry_point(ckpt, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video" * 100)
    proc = subprocess.run([sys.executable, "-m", "mae_st_jax.visualize", f"--init_from={ckpt}",
                           f"--video={corrupt}", f"--output={tmp_path / 'x.gif'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"visualize: cannot read video {corrupt}")


def test_pytorch_import_directory_gives_the_same_pictures(ckpt, video, tmp_path):
    """A mae_st .pth of the same weights, through `convert.from_torch`, reconstructs identically."""
    import torch

    from mae_st_jax.convert import from_torch

    pth = str(tmp_path / "mae.pth")
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in from_torch.params_to_torch(_params()).items()}}, pth)
    imported = str(tmp_path / "imported")
    config = from_torch.convert(pth, imported, overrides=dict(num_heads=2, decoder_num_heads=2))
    assert config["kind"] == "pretrain" and config["pred_t_dim"] == MODEL["pred_t_dim"]
    ours = cli(f"--init_from={ckpt}", f"--video={video}", f"--output={tmp_path / 'a.png'}", "--mask_ratio=0.75")
    theirs = cli(f"--init_from={imported}", f"--video={video}", f"--output={tmp_path / 'b.png'}",
                 "--mask_ratio=0.75")
    np.testing.assert_array_equal(ours.reconstructions[0].mask, theirs.reconstructions[0].mask)
    np.testing.assert_allclose(ours.reconstructions[0].reconstruction, theirs.reconstructions[0].reconstruction,
                               atol=1e-5)
    assert theirs.reconstructions[0].norm_pix  # the importer's default, as the paper's recipe


def test_every_frame_predicted_two_frames_per_token():
    """pred_t_dim == num_frames: tokens predict both frames of their 2-frame tube (u=2); all frames shown."""
    model = MaskedAutoencoder(rngs=nnx.Rngs(1), **dict(MODEL, pred_t_dim=4, norm_pix_loss=False))
    assert model.t_pred_patch == 2
    video = jax.random.normal(jax.random.key(0), (1, 4, 32, 32, 3))
    rec = visualize.reconstruct(model, video, model.make_noise(jax.random.key(1), 1), 0.75)[0]
    assert rec.frames == (0, 1, 2, 3) and rec.original.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(rec.original, np.asarray(video[0]))
    np.testing.assert_array_equal(rec.mask[0::2], rec.mask[1::2])  # one mask per 2-frame token
    assert int((~rec.mask[::2, ::8, ::8]).sum()) == rec.num_visible == 8
    np.testing.assert_array_equal(rec.reconstruction[~rec.mask], rec.original[~rec.mask])
