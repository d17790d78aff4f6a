"""Tests for the optimiser pieces (mae_st_jax.train.optim): schedule, lr scaling, decay mask, AdamW."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from mae_st_jax import config_lib
from mae_st_jax.models.mae import MaskedAutoencoder, model_kwargs
from mae_st_jax.train import optim

# ----------------------------------------------------------------------------------------------
# schedule

PEAK, MIN_LR, WARMUP, TOTAL = 1e-3, 1e-5, 10, 110


def lr_at(schedule, step):
    return float(schedule(step))


def test_warmup_cosine_key_points():
    s = optim.warmup_cosine(PEAK, WARMUP, TOTAL, MIN_LR)
    assert lr_at(s, 0) == 0.0
    assert lr_at(s, WARMUP // 2) == pytest.approx(PEAK / 2, rel=1e-6)  # linear warmup
    assert lr_at(s, WARMUP) == pytest.approx(PEAK, rel=1e-6)
    assert lr_at(s, (WARMUP + TOTAL) // 2) == pytest.approx((PEAK + MIN_LR) / 2, rel=1e-5)
    assert lr_at(s, TOTAL) == pytest.approx(MIN_LR, rel=1e-5)
    assert lr_at(s, TOTAL + 50) == pytest.approx(MIN_LR, rel=1e-5)  # stays at min_lr after the end
    # a quarter of the way into the cosine: min + (peak - min) * (1 + cos(pi/4)) / 2
    q = WARMUP + (TOTAL - WARMUP) // 4
    assert lr_at(s, q) == pytest.approx(MIN_LR + (PEAK - MIN_LR) * (1 + math.cos(math.pi / 4)) / 2, rel=1e-5)


def test_warmup_cosine_shape():
    s = optim.warmup_cosine(PEAK, WARMUP, TOTAL, MIN_LR)
    steps = np.arange(0, TOTAL + 20)
    lrs = np.asarray(jax.vmap(s)(jnp.asarray(steps)))
    warm = lrs[: WARMUP + 1]
    assert np.all(np.diff(warm) > 0)  # increasing during warmup
    np.testing.assert_allclose(warm, PEAK * steps[: WARMUP + 1] / WARMUP, rtol=1e-5)
    after = lrs[WARMUP:]
    assert np.all(np.diff(after) <= 1e-12)  # non-increasing after warmup
    assert lrs.max() == pytest.approx(PEAK, rel=1e-6)
    assert lrs.min() >= 0
    assert np.all(lrs[WARMUP:] >= MIN_LR * (1 - 1e-5))
    # python ints and jnp scalars agree
    assert float(s(jnp.int32(37))) == float(s(37))


def test_warmup_cosine_no_warmup():
    s = optim.warmup_cosine(PEAK, 0, 100, 0.0)
    assert lr_at(s, 0) == pytest.approx(PEAK, rel=1e-6)
    assert lr_at(s, 50) == pytest.approx(PEAK / 2, rel=1e-5)
    assert lr_at(s, 100) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# peak lr


def test_peak_lr_ignores_repeat_aug_by_default():
    c = config_lib.base_config()  # batch 512 clips, repeat_aug 4, blr 1.6e-3
    assert not c.optim.lr_counts_repeat_aug
    assert optim.peak_learning_rate(c) == pytest.approx(1.6e-3 * 512 / 4 / 256)  # 8e-4
    c.batch_size, c.data.repeat_aug = 256, 2
    assert optim.peak_learning_rate(c) == pytest.approx(1.6e-3 * 256 / 2 / 256)


def test_peak_lr_counting_repeat_aug():
    c = config_lib.base_config()
    c.optim.lr_counts_repeat_aug = True
    assert optim.peak_learning_rate(c) == pytest.approx(1.6e-3 * 512 / 256)  # 3.2e-3


def test_peak_lr_override():
    c = config_lib.base_config()
    c.optim.lr = 1.234e-4
    assert optim.peak_learning_rate(c) == pytest.approx(1.234e-4)
    c.optim.lr_counts_repeat_aug = True
    assert optim.peak_learning_rate(c) == pytest.approx(1.234e-4)


def test_demo_peak_lr():
    # configs/demo.py: blr = 1.5e-3 * 256 / 16 at 32 clips / repeat_aug 2 = 16 videos -> 1.5e-3
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
    spec = importlib.util.spec_from_file_location("test_optim_demo", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert optim.peak_learning_rate(mod.get_config()) == pytest.approx(1.5e-3)


# ----------------------------------------------------------------------------------------------
# weight-decay mask


def tiny_param_shapes():
    """The tiny MAE's parameter tree (shapes only: no init compiled)."""
    kw = dict(model_kwargs("tiny"), img_size=32, num_frames=8, decoder_embed_dim=32, decoder_depth=1,
              decoder_num_heads=4, pred_t_dim=4)
    model = nnx.eval_shape(lambda: MaskedAutoencoder(rngs=nnx.Rngs(0), **kw))
    return nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])


@pytest.mark.parametrize("decay_tokens", [True, False])
def test_decay_mask_on_tiny_mae(decay_tokens):
    params = tiny_param_shapes()
    mask = traverse_util.flatten_dict(optim.decay_mask(params, decay_tokens=decay_tokens))
    flat = traverse_util.flatten_dict(params)
    assert set(mask) == set(flat)
    tokens = {"cls_token", "mask_token", "decoder_cls_token", "pos_embed_spatial", "pos_embed_temporal",
              "pos_embed_class", "decoder_pos_embed_spatial", "decoder_pos_embed_temporal",
              "decoder_pos_embed_class"}
    counts = {"bias": 0, "scale": 0, "kernel": 0, "token": 0}
    for path, decayed in mask.items():
        leaf = path[-1]
        assert isinstance(decayed, bool), path
        if leaf in ("bias", "scale"):
            assert not decayed, path
            counts[leaf] += 1
        elif leaf == "kernel":
            assert decayed, path
            counts["kernel"] += 1
        else:
            assert leaf in tokens, path  # nothing else in the model
            assert bool(decayed) == decay_tokens, path
            counts["token"] += 1
    # every token/pos leaf is present; kernels: patch embed, 6 per block * (2 + 1 blocks), decoder
    # embed + pred; LayerNorms: 2 per block + 2 final
    assert counts["token"] == len(tokens)
    assert counts["kernel"] == 1 + 6 * 3 + 2
    assert counts["scale"] == 2 * 3 + 2 and counts["bias"] == 1 + 6 * 3 + (2 * 3 + 2) + 2
    # 1-D parameters are never decayed
    for path, decayed in mask.items():
        if flat[path].ndim == 1:
            assert not decayed, path


# ----------------------------------------------------------------------------------------------
# one AdamW step against numpy


def toy_params():
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                  "bias": rng.normal(size=(4,)).astype(np.float32)},
        "norm": {"scale": (1 + rng.normal(size=(4,)) * 0.1).astype(np.float32),
                 "bias": rng.normal(size=(4,)).astype(np.float32)},
        "pos_embed_spatial": rng.normal(size=(1, 5, 4)).astype(np.float32),
        "cls_token": rng.normal(size=(1, 1, 4)).astype(np.float32),
    }


def toy_grads(seed, scale):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: (rng.normal(size=p.shape) * scale).astype(np.float32), toy_params())


def toy_config(decay_tokens=True, clip=0.5):
    c = config_lib.base_config()
    c.optim.update(lr=2e-2, min_lr=0.0, weight_decay=0.1, clip_grad=clip, decay_tokens=decay_tokens)
    return c


def numpy_adamw(params, grads_list, *, lrs, decay, clip, b1=0.9, b2=0.95, eps=1e-8, wd=0.1):
    """Clip by global norm (torch's clip_grad_norm_: min(1, clip / (norm + 1e-6))) -> Adam (bias-corrected)
    -> + wd * p where decayed -> * -lr."""
    flat_p = {k: np.asarray(v, np.float64) for k, v in traverse_util.flatten_dict(params).items()}
    m = {k: np.zeros_like(v) for k, v in flat_p.items()}
    v = {k: np.zeros_like(x) for k, x in flat_p.items()}
    for i, (grads, lr) in enumerate(zip(grads_list, lrs), start=1):
        g = {k: np.asarray(x, np.float64) for k, x in traverse_util.flatten_dict(grads).items()}
        if clip > 0:
            norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
            coef = clip / (norm + 1e-6)
            if coef < 1:
                g = {k: x * coef for k, x in g.items()}
        for k in flat_p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            upd = (m[k] / (1 - b1 ** i)) / (np.sqrt(v[k] / (1 - b2 ** i)) + eps)
            if decay[k]:
                upd = upd + wd * flat_p[k]
            flat_p[k] = flat_p[k] - lr * upd
    return flat_p


def run_optimizer(config, grads_list, total=100, warmup=0):
    tx, schedule = optim.make_optimizer(config, total, warmup)
    params = jax.tree.map(jnp.asarray, toy_params())
    state = tx.init(params)
    lrs = []
    for step, grads in enumerate(grads_list):
        lrs.append(float(schedule(step)))
        updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state, params)
        params = optax.apply_updates(params, updates)
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}, lrs


def decay_of(decay_tokens):
    return {k: (k[-1] == "kernel") or (decay_tokens and k[-1] not in ("bias", "scale"))
            for k in traverse_util.flatten_dict(toy_params())}


@pytest.mark.parametrize("decay_tokens", [True, False])
def test_one_adamw_step_matches_numpy(decay_tokens):
    config = toy_config(decay_tokens)
    grads = toy_grads(1, 1.0)  # global norm ~ 5 > clip 0.5
    got, lrs = run_optimizer(config, [grads])
    assert lrs[0] == pytest.approx(2e-2, rel=1e-6)  # warmup_steps=0: peak (the lr override) at step 0
    want = numpy_adamw(toy_params(), [grads], lrs=[2e-2], decay=decay_of(decay_tokens), clip=0.5)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=str(k))
    # the decay mask matters: kernel and (if decayed) tokens moved by lr*wd*p beyond the Adam step
    p0 = traverse_util.flatten_dict(toy_params())
    g = traverse_util.flatten_dict(grads)
    for k in want:
        adam_only = p0[k] - 2e-2 * np.sign(g[k])  # first Adam step is ~sign(g)
        if decay_of(decay_tokens)[k]:
            np.testing.assert_allclose(got[k], adam_only - 2e-2 * 0.1 * p0[k], rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_allclose(got[k], adam_only, rtol=1e-4, atol=1e-6)


def test_clipping_is_torch_clip_grad_norm():
    """The first moment after one step is (1 - b1) x the clipped gradient: torch's, with its + 1e-6."""
    import torch  # a test dependency (setup.py's test extra)
    config = toy_config(True, clip=0.02)
    grads = toy_grads(3, 1.0)
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: g * np.float32(0.0201 / norm), grads)  # norm just above the clip
    tx, _ = optim.make_optimizer(config, 100, 0)
    params = jax.tree.map(jnp.asarray, toy_params())
    _, state = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(params), params)
    flat_g = traverse_util.flatten_dict(grads)
    tensors = {k: torch.nn.Parameter(torch.zeros(v.shape)) for k, v in flat_g.items()}
    for k, t in tensors.items():
        t.grad = torch.from_numpy(np.array(flat_g[k]))
    torch.nn.utils.clip_grad_norm_(list(tensors.values()), 0.02)
    mu = traverse_util.flatten_dict(state.mu)
    for k, t in tensors.items():
        np.testing.assert_allclose(np.asarray(mu[k]), 0.1 * t.grad.numpy(), rtol=2e-6, atol=0, err_msg=str(k))
    # optax's clip / norm would be off by ~5e-5 here: the test can tell the two apart
    assert abs(0.02 / 0.0201 / (0.02 / (0.0201 + 1e-6)) - 1) > 4e-5


def test_lr_follows_the_training_step_when_given():
    """A skipped (non-finite) update does not advance the optimizer's count; the lr still follows the
    loop's step, as the reference's per-iteration schedule."""
    config = toy_config(True, clip=0.0)
    tx, schedule = optim.make_optimizer(config, 100, 10)
    params = jax.tree.map(jnp.asarray, toy_params())
    grads = jax.tree.map(jnp.asarray, toy_grads(1, 1.0))
    state = tx.init(params)
    by_count, _ = tx.update(grads, state, params)  # count 0: lr 0 at the start of the warmup
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(by_count))
    at5, _ = tx.update(grads, state, params, step=jnp.asarray(5))
    at7, _ = tx.update(grads, state, params, step=jnp.asarray(7))
    want = float(schedule(7)) / float(schedule(5))
    assert 0 < float(schedule(5)) < float(schedule(7))
    for a, b in zip(jax.tree.leaves(at5), jax.tree.leaves(at7)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a) * want, rtol=1e-5)


def test_two_adamw_steps_with_clipping_match_numpy():
    # step 1 clipped (norm ~ 5 > 0.5), step 2 not (norm ~ 0.05): Adam's moments see the clipped
    # gradient, so clipping before Adam changes the second update
    config = toy_config(True)
    grads = [toy_grads(1, 1.0), toy_grads(2, 0.01)]
    got, lrs = run_optimizer(config, grads)
    s = optim.warmup_cosine(2e-2, 0, 100, 0.0)
    assert lrs == pytest.approx([float(s(0)), float(s(1))], rel=1e-6)
    assert lrs[1] == pytest.approx(2e-2 * 0.5 * (1 + math.cos(math.pi / 100)), rel=1e-6)
    want = numpy_adamw(toy_params(), grads, lrs=lrs, decay=decay_of(True), clip=0.5)
    unclipped = numpy_adamw(toy_params(), grads, lrs=lrs, decay=decay_of(True), clip=0.0)
    gap = max(np.abs(want[k] - unclipped[k]).max() for k in want)
    assert gap > 1e-3  # the test can tell clipping from no clipping
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=str(k))


def test_no_clipping_when_clip_grad_zero():
    config = toy_config(True, clip=0.0)
    grads = [toy_grads(1, 1.0), toy_grads(2, 0.01)]
    got, lrs = run_optimizer(config, grads)
    want = numpy_adamw(toy_params(), grads, lrs=lrs, decay=decay_of(True), clip=0.0)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=str(k))


def test_optimizer_uses_warmup():
    config = toy_config(True)
    tx, schedule = optim.make_optimizer(config, 100, 10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(2e-2, rel=1e-6)
    params = jax.tree.map(jnp.asarray, toy_params())
    updates, _ = tx.update(jax.tree.map(jnp.asarray, toy_grads(1, 1.0)), tx.init(params), params)
    for u in jax.tree.leaves(updates):  # lr 0 at step 0: nothing moves
        np.testing.assert_array_equal(np.asarray(u), 0)


@pytest.mark.parametrize("clip", [0.5, 0.0])
def test_fused_adamw_equals_the_optax_chain(clip):
    """optim.adamw (one pass per parameter) == optax's clip -> adam -> masked decay -> lr scales -> lr,
    over 3 steps (clipped and not), with per-parameter lr scales; passing the precomputed global
    norm changes nothing."""
    config = toy_config(True, clip=clip)
    schedule = optim.warmup_cosine(2e-2, 1, 10, 0.0)
    params = jax.tree.map(jnp.asarray, toy_params())
    scales = jax.tree.map(lambda p: np.float32(0.5 + p.size % 3), toy_params())
    o = config.optim
    parts = ([optax.clip_by_global_norm(clip)] if clip else []) + [
        optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
        optax.add_decayed_weights(o.weight_decay, mask=lambda p: optim.decay_mask(p, True)),
        optax.GradientTransformation(lambda _: optax.EmptyState(),
                                     lambda u, s, p=None: (jax.tree.map(lambda a, b: a * b, u, scales), s)),
        optax.scale_by_learning_rate(schedule)]
    chain = optax.chain(*parts)
    fused = optim.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_grad=clip,
                        decay_tokens=True, lr_scales=scales)
    runs = []
    for tx, with_norm in ((chain, False), (fused, False), (fused, True)):
        p, state = params, tx.init(params)
        for i, size in enumerate((1.0, 0.01, 3.0)):
            g = jax.tree.map(jnp.asarray, toy_grads(i + 1, size))
            extra = {"grad_norm": optim.global_norm(g)} if with_norm else {}
            u, state = tx.update(g, state, p, **extra)
            p = optax.apply_updates(p, u)
        runs.append(p)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(params)))
    assert moved > 1e-3
    for a, b, c in zip(*(jax.tree.leaves(r) for r in runs)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-6, atol=1e-8)
        np.testing.assert_array_equal(np.asarray(c), np.asarray(b))
    assert int(state.count) == 3
