"""Test setup: 8 fake CPU devices (set before JAX is imported) and small shared helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tests build the same tiny programs many times: a persistent compile cache saves minutes
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"mae_st_jax_test_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # ml_collections' config_flags loads --config files with the deprecated loader.load_module() (its code, not
    # ours: tests/test_launch.py parses flags through it 29 times); anything else deprecated still shows
    config.addinivalue_line("filterwarnings", r"ignore:the load_module\(\) method is deprecated:DeprecationWarning")


def load_config_module(name: str):
    """Import configs/<name>.py by path, as the --config flag does."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_config():
    """A seconds-scale pre-training config: tiny model, synthetic videos, batch 8."""
    return tiny()


def tiny():
    """tiny_config's config, for code a test runs in a subprocess."""
    c = load_config_module("demo").get_config()
    c.model.update(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, num_frames=4,
                   decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, pred_t_dim=2)
    c.data.update(num_videos=64, video_frames=16, num_workers=1, prefetch=1)
    c.batch_size = 8
    c.total_steps = 4
    c.schedule_steps = 8
    c.warmup_steps = 2
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.write_reconstruction = False
    c.async_checkpoints = False
    return c
