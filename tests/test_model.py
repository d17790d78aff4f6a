"""Tests for the MAE-ST model (mae_st_jax.models.mae / layers): patchify, target and loss, embedding,
position tables, masking inputs, initialisation, shapes, dtypes, remat and scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from mae_st_jax.models import layers, mae
from mae_st_jax.models.mae import MaskedAutoencoder, model_kwargs, target_frame_indices

B = 2
NUM_FRAMES, IMG, T_PATCH = 8, 32, 2


def tiny_kwargs(**overrides):
    kw = model_kwargs("tiny")  # embed 64, depth 2, heads 4, patch 8
    kw.update(img_size=IMG, num_frames=NUM_FRAMES, t_patch_size=T_PATCH, decoder_embed_dim=32,
              decoder_depth=1, decoder_num_heads=4, pred_t_dim=NUM_FRAMES // 2, mask_ratio=0.75)
    kw.update(overrides)
    return kw


# XLA:CPU compile time dominates this file; LLVM -O0 halves it and does not change what is tested
# (every comparison is between programs compiled the same way, or against float64 numpy).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def build(cls, **kwargs):
    """cls(rngs=nnx.Rngs(0), **kwargs), initialised by one jitted program.

    Eager NNX init compiles one threefry kernel per parameter shape (~8 s for the tiny MAE on
    2 CPU cores); traced under jit it is one ~3 s compile. Same constructor, same initialisers.
    """
    ctor = lambda: cls(rngs=nnx.Rngs(0), **kwargs)  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(ctor))
    state = jax.jit(lambda: nnx.split(ctor())[1]).lower().compile(FAST_COMPILE)()
    return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=None)
def _build(items):
    kwargs = tiny_kwargs(**dict(items))
    if not items:
        return build(MaskedAutoencoder, **kwargs)
    # a variant: the default's values where names and shapes match, numpy draws elsewhere
    default = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.split(_build(()))[1]))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MaskedAutoencoder(rngs=nnx.Rngs(0), **kwargs)))
    rng = np.random.default_rng(len(items))
    values = {}
    for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items():
        if k in default and default[k].shape == v.shape and default[k].dtype == v.dtype:
            values[k] = default[k]
        elif k[-1] in ("bias", "scale"):
            values[k] = jnp.full(v.shape, float(k[-1] == "scale"), v.dtype)
        else:
            values[k] = jnp.asarray(rng.normal(size=v.shape) * 0.02, v.dtype)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    return nnx.merge(graphdef, state)


def make_model(**overrides):
    """The tiny MAE, built once per setting and never mutated (tests split/merge).

    make_model() is the library's init (seed 0). A variant shares its values wherever names and
    shapes match (so variants are comparable: same weights, other settings); a parameter the
    default lacks (joint pos tables, the u=2 prediction head) is drawn with numpy, std 0.02 (one
    jitted init per variant would cost ~3 s of compile each).
    """
    return _build(tuple(sorted(overrides.items())))


def video(seed=0, frames=NUM_FRAMES, size=IMG, batch=B):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, frames, size, size, 3)), jnp.float32)


def noise_for(model, seed=0, batch=B):
    return jnp.asarray(np.random.default_rng(100 + seed).uniform(size=(batch, model.geometry.num_patches)),
                       jnp.float32)


_COMPILED = {}


def _run(name, model, fn, *args):
    """fn(state, *args) compiled once per (model, name, argument shapes)."""
    graphdef, state = nnx.split(model)
    sig = (id(model), name, tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args)))
    if sig not in _COMPILED:
        _COMPILED[sig] = jax.jit(functools.partial(fn, graphdef)).lower(state, *args).compile(FAST_COMPILE)
    return _COMPILED[sig](state, *args)


def apply(model, vid, noise):
    """jit(model(vid, noise)) -> (loss, pred, mask), without mutating the model."""
    return _run("noise", model, lambda g, s, v, n: nnx.merge(g, s)(v, n), vid, noise)


def embed(model, vid, ids_keep=None):
    if ids_keep is None:
        return _run("embed_all", model, lambda g, s, v: nnx.merge(g, s).embed(v, None), vid)
    return _run("embed", model, lambda g, s, v, i: nnx.merge(g, s).embed(v, i), vid, ids_keep)


def apply_key(model, vid, key):
    return _run("key", model, lambda g, s, v, k: nnx.merge(g, s)(v, key=k), vid, key)


def loss_and_grads(model, vid, noise):
    """jit(value_and_grad(loss)) w.r.t. the nnx.Param leaves -> (loss, nested dict of grads)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    sig = (id(model), "grad")
    if sig not in _COMPILED:
        def f(p, r, v, n):
            return jax.value_and_grad(lambda q: nnx.merge(graphdef, q, r)(v, n)[0])(p)
        _COMPILED[sig] = jax.jit(f).lower(params, rest, vid, noise).compile(FAST_COMPILE)
    loss, grads = _COMPILED[sig](params, rest, vid, noise)
    return loss, nnx.to_pure_dict(grads)


def flat_params(model):
    return {"/".join(map(str, k)): np.asarray(v)
            for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])).items()}


# ----------------------------------------------------------------------------------------------
# numpy references, written from REFERENCE.md in channels-first form


def np_patchify_cf(video_cf, t, p):
    """[N, 3, T, H, W] -> (N, 3, t', u, h, p, w, q) -> 'nctuhpwq->nthwupqc' -> [N, L, u*p*p*3]."""
    n, c, tt, hh, ww = video_cf.shape
    x = video_cf.reshape(n, c, tt // t, t, hh // p, p, ww // p, p)
    x = np.einsum("nctuhpwq->nthwupqc", x)
    return x.reshape(n, (tt // t) * (hh // p) * (ww // p), t * p * p * c)


def np_loss(vid, pred, mask, *, num_frames, pred_t_dim, t_patch, p, norm_pix, mode):
    vid, pred, mask = (np.asarray(a, np.float64) for a in (vid, pred, mask))
    if mode == "linspace":
        idx = np.linspace(0, num_frames - 1, pred_t_dim).astype(np.int64)  # truncated
    else:
        idx = np.arange(0, num_frames, num_frames // pred_t_dim)
    u = t_patch * pred_t_dim // num_frames
    target = np_patchify_cf(vid[:, idx].transpose(0, 4, 1, 2, 3), u, p)
    if norm_pix:
        mean = target.mean(-1, keepdims=True)
        var = target.var(-1, keepdims=True, ddof=1)
        target = (target - mean) / np.sqrt(var + 1e-6)
    per_token = ((pred - target) ** 2).mean(-1)
    return (per_token * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------------------------
# patchify


def test_patchify_unpatchify_round_trip():
    x = video(seed=1)  # [2, 8, 32, 32, 3]
    tokens = layers.patchify(x, 2, 8)
    assert tokens.shape == (2, 4 * 4 * 4, 2 * 8 * 8 * 3)
    back = layers.unpatchify(tokens, (4, 4, 4), 2, 8)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
    # and the other way round
    np.testing.assert_array_equal(np.asarray(layers.patchify(back, 2, 8)), np.asarray(tokens))


@pytest.mark.parametrize("t,p", [(2, 8), (1, 4), (4, 16)])
def test_patchify_matches_channels_first_reference(t, p):
    x = np.random.default_rng(2).normal(size=(2, 8, 32, 32, 3)).astype(np.float32)
    want = np_patchify_cf(x.transpose(0, 4, 1, 2, 3), t, p)
    np.testing.assert_array_equal(np.asarray(layers.patchify(jnp.asarray(x), t, p)), want)


def test_patchify_token_and_vector_order_hand_made():
    # T=4, H=6, W=9, t=2, p=3: grid (2, 2, 3); every value encodes its (frame, row, col, channel)
    tt, hh, ww, c, t, p = 4, 6, 9, 3, 2, 3
    f, y, x, ch = np.meshgrid(np.arange(tt), np.arange(hh), np.arange(ww), np.arange(c), indexing="ij")
    vid = (((f * 100 + y) * 100 + x) * 10 + ch).astype(np.float32)[None]  # [1, 4, 6, 9, 3]
    tokens = np.asarray(layers.patchify(jnp.asarray(vid), t, p))
    gh, gw = hh // p, ww // p
    assert tokens.shape == (1, 2 * gh * gw, t * p * p * c)
    for ti in range(tt // t):
        for hi in range(gh):
            for wi in range(gw):
                token = ti * gh * gw + hi * gw + wi
                for ui in range(t):
                    for r in range(p):
                        for q in range(p):
                            for ci in range(c):
                                k = ((ui * p + r) * p + q) * c + ci  # (t, row, col, channel), channel fastest
                                want = (((ti * t + ui) * 100 + hi * p + r) * 100 + wi * p + q) * 10 + ci
                                assert tokens[0, token, k] == want, (token, k)
    np.testing.assert_array_equal(tokens, np_patchify_cf(vid.transpose(0, 4, 1, 2, 3), t, p))
    back = layers.unpatchify(jnp.asarray(tokens), (2, gh, gw), t, p)
    np.testing.assert_array_equal(np.asarray(back), vid)


# ----------------------------------------------------------------------------------------------
# target frames and loss


def test_target_frame_indices():
    assert target_frame_indices(16, 8, "linspace").tolist() == [0, 2, 4, 6, 8, 10, 12, 15]
    assert target_frame_indices(16, 8, "stride").tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert target_frame_indices(8, 4, "linspace").tolist() == [0, 2, 4, 7]
    assert target_frame_indices(8, 4, "stride").tolist() == [0, 2, 4, 6]
    assert target_frame_indices(8, 8, "linspace").tolist() == list(range(8))
    with pytest.raises(ValueError):
        target_frame_indices(16, 8, "middle")
    with pytest.raises(ValueError):
        target_frame_indices(8, 16, "linspace")


def test_token_grid_of_a_config_is_the_models_grid():
    import ml_collections
    cfg = dict(num_frames=16, img_size=112, patch_size=16, t_patch_size=2)
    assert mae.token_grid(cfg) == (8, 7, 7)
    assert mae.token_grid(ml_collections.ConfigDict(dict(cfg, num_frames=8, t_patch_size=4))) == (2, 7, 7)
    assert mae.token_grid({k: v for k, v in cfg.items() if k != "patch_size"}) is None
    model = MaskedAutoencoder(rngs=nnx.Rngs(0), **dict(model_kwargs("vit_s"), **cfg, depth=1, decoder_depth=1))
    assert mae.token_grid(cfg) == model.geometry.grid


def test_loss_from_call_matches_numpy():
    model = make_model()  # norm_pix_loss=True, target_frames='linspace'
    vid = video(3)
    loss, pred, mask = apply(model, vid, noise_for(model))
    want = np_loss(vid, pred, mask, num_frames=NUM_FRAMES, pred_t_dim=NUM_FRAMES // 2, t_patch=T_PATCH,
                   p=8, norm_pix=True, mode="linspace")
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_array_equal((np.asarray(mask) == 0).sum(1), np.full(B, model.num_visible()))
    assert model.num_visible() == 16  # int(64 * 0.25)
    assert model.num_visible(0.5) == 32 and model.num_visible(0.9) == 6  # the per-call override


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("mode", ["linspace", "stride"])
def test_loss_matches_numpy(norm_pix, mode):
    # pred from the default model's forward (the prediction does not depend on these two settings:
    # same parameters); the loss of each variant against numpy
    vid = video(3)
    _, pred, mask = apply(make_model(), vid, noise_for(make_model()))
    model = make_model(norm_pix_loss=norm_pix, target_frames=mode)
    assert model.target_frames == tuple(target_frame_indices(NUM_FRAMES, NUM_FRAMES // 2, mode).tolist())
    loss = model.loss(vid, pred, mask)
    want = np_loss(vid, pred, mask, num_frames=NUM_FRAMES, pred_t_dim=NUM_FRAMES // 2, t_patch=T_PATCH,
                   p=8, norm_pix=norm_pix, mode=mode)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_loss_variants_differ():
    # the settings matter: each variant's loss on the same prediction is different
    vid = video(3)
    _, pred, mask = apply(make_model(), vid, noise_for(make_model()))
    losses = {(n, m): float(make_model(norm_pix_loss=n, target_frames=m).loss(vid, pred, mask))
              for n in (True, False) for m in ("linspace", "stride")}
    assert len(set(losses.values())) == 4, losses


def test_loss_matches_numpy_full_frame_target():
    # pred_t_dim = num_frames -> u = t = 2 and every frame is a target
    model = make_model(pred_t_dim=NUM_FRAMES, norm_pix_loss=True)
    vid = video(4)
    loss, pred, mask = apply(model, vid, noise_for(model))
    want = np_loss(vid, pred, mask, num_frames=NUM_FRAMES, pred_t_dim=NUM_FRAMES, t_patch=T_PATCH, p=8,
                   norm_pix=True, mode="linspace")
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_norm_pix_target_unbiased():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 3, 12)) * 3 + 1, jnp.float32)
    got = np.asarray(mae.norm_pix_target(x))
    xn = np.asarray(x, np.float64)
    want = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # unbiased: the sample variance of every normalised token is 1 (not (n-1)/n)
    np.testing.assert_allclose(got.var(-1, ddof=1), 1.0, rtol=1e-4)


def test_loss_depends_only_on_masked_tokens():
    model = make_model()
    vid = video(6)
    _, pred, mask = apply(model, vid, noise_for(model))
    mask_np = np.asarray(mask)
    delta = np.random.default_rng(7).normal(size=pred.shape).astype(np.float32) * 10
    visible_delta = delta * (1 - mask_np)[..., None]
    masked_delta = delta * mask_np[..., None]
    base = float(model.loss(vid, pred, mask))
    np.testing.assert_allclose(float(model.loss(vid, pred + visible_delta, mask)), base, rtol=1e-6)
    assert abs(float(model.loss(vid, pred + masked_delta, mask)) - base) > 1.0
    # the gradient w.r.t. pred vanishes at visible tokens
    g = np.asarray(jax.grad(lambda pr: model.loss(vid, pr, mask))(pred))
    assert np.all(g[mask_np == 0] == 0)
    assert np.abs(g[mask_np == 1]).max() > 0


# ----------------------------------------------------------------------------------------------
# embedding and position tables


@pytest.mark.parametrize("cls_embed", [True, False])
@pytest.mark.parametrize("sep_pos_embed", [True, False])
def test_gather_before_embed(cls_embed, sep_pos_embed):
    model = make_model(cls_embed=cls_embed, sep_pos_embed=sep_pos_embed)
    vid = video(8)
    ids_keep = jnp.asarray(np.stack([np.sort(np.random.default_rng(i).permutation(64)[:16]) for i in range(B)]))
    ids_keep = ids_keep[:, ::-1]  # any order
    full = np.asarray(embed(model, vid))
    part = np.asarray(embed(model, vid, ids_keep))
    c = int(cls_embed)
    assert full.shape == (B, 64 + c, 64)
    assert part.shape == (B, 16 + c, 64)
    want = np.take_along_axis(full[:, c:], np.asarray(ids_keep)[..., None], axis=1)
    np.testing.assert_allclose(part[:, c:], want, rtol=1e-6, atol=1e-6)
    if cls_embed:
        np.testing.assert_array_equal(part[:, 0], full[:, 0])
        cls_pos = model.encoder_pos_embed()[1]
        np.testing.assert_allclose(full[:, 0], np.broadcast_to(
            np.asarray(model.cls_token[...][0] + cls_pos), (B, 64)), rtol=1e-6)


def test_embed_equals_conv_plus_pos():
    # embed(video) = Conv3d(kernel = stride = (t, p, p)) + pos, token order time-major
    model = make_model(cls_embed=False)
    vid = video(9)
    conv = np.asarray(model.patch_embed.proj(vid))  # [B, T', H', W', E]
    pos = np.asarray(model.encoder_pos_embed()[0])
    want = conv.reshape(B, -1, 64) + pos[None]
    np.testing.assert_allclose(np.asarray(embed(model, vid)), want, rtol=1e-5, atol=1e-5)


def test_separable_pos_table():
    model = make_model()
    t, h, w = model.geometry.grid
    for prefix in ("", "decoder_"):
        pos, cls_pos = mae._pos_tables(model, prefix, model.geometry.grid)
        pos = np.asarray(pos)
        spatial = np.asarray(getattr(model, prefix + "pos_embed_spatial")[...][0])
        temporal = np.asarray(getattr(model, prefix + "pos_embed_temporal")[...][0])
        assert pos.shape == (t * h * w, spatial.shape[-1])
        for ti in range(t):
            for s in range(h * w):
                np.testing.assert_array_equal(pos[ti * h * w + s], spatial[s] + temporal[ti])
        np.testing.assert_array_equal(np.asarray(cls_pos),
                                      np.asarray(getattr(model, prefix + "pos_embed_class")[...][0]))


def test_joint_pos_table():
    model = make_model(sep_pos_embed=False)
    pos, cls_pos = model.encoder_pos_embed()
    table = np.asarray(model.pos_embed[...][0])
    assert table.shape == (64 + 1, 64)
    np.testing.assert_array_equal(np.asarray(pos), table[1:])
    np.testing.assert_array_equal(np.asarray(cls_pos), table[:1])
    assert model.decoder_pos_embed.shape == (1, 65, 32)


# ----------------------------------------------------------------------------------------------
# masking inputs: noise and key


def test_noise_and_key_give_same_result():
    model = make_model()
    vid = video(10)
    key = jax.random.key(3)
    noise = model.make_noise(key, B)
    a = apply(model, vid, noise)
    b = apply(model, vid, noise)
    c = apply_key(model, vid, key)
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
    # a different key gives a different mask
    d = apply_key(model, vid, jax.random.key(4))
    assert not np.array_equal(np.asarray(a[2]), np.asarray(d[2]))
    with pytest.raises(ValueError):
        model(vid)


def test_visible_tokens_do_not_see_masked_pixels():
    # the encoder sees only the kept patches: with the same noise, changing the pixels of masked
    # patches leaves the prediction bit-identical (the loss changes: its targets moved)
    model = make_model()
    vid = video(11)
    noise = noise_for(model)
    _, pred, mask = apply(model, vid, noise)
    token_mask = np.asarray(mask).reshape(B, 4, 4, 4)  # [B, T', H', W']
    pix_mask = token_mask.repeat(2, 1).repeat(8, 2).repeat(8, 3)[..., None]  # [B, T, H, W, 1]
    vid2 = vid + jnp.asarray(pix_mask * 5.0, jnp.float32)
    loss2, pred2, _ = apply(model, vid2, noise)
    np.testing.assert_array_equal(np.asarray(pred2), np.asarray(pred))
    # ... while changing one visible patch does change it
    keep = np.argwhere(np.asarray(mask)[0] == 0)[0, 0]
    t, h, w = keep // 16, (keep // 4) % 4, keep % 4
    vid3 = np.asarray(vid).copy()
    vid3[0, 2 * t:2 * t + 2, 8 * h:8 * h + 8, 8 * w:8 * w + 8] += 5.0
    _, pred3, _ = apply(model, jnp.asarray(vid3), noise)
    assert np.abs(np.asarray(pred3) - np.asarray(pred)).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# initialisation


def test_init_statistics_b16_tables():
    # B/16 geometry and width: pos tables [196, 768] + [8, 768]; one block (mlp_ratio 1 keeps
    # the number of distinct parameter shapes, hence init compiles, small)
    encoder = build(mae.VideoEncoder, **dict(
        model_kwargs("vit_b"), depth=1, mlp_ratio=1.0, img_size=224, num_frames=16, t_patch_size=2))
    params = flat_params(encoder)
    assert params["pos_embed_spatial"].shape == (1, 196, 768)
    assert params["pos_embed_temporal"].shape == (1, 8, 768)
    for name in ("pos_embed_spatial", "pos_embed_temporal", "pos_embed_class", "cls_token"):
        v = params[name]
        assert abs(v.std() / 0.02 - 1) < 0.2, (name, v.std())
        assert abs(v.mean()) < 0.01, name
    # patch embed: xavier-uniform with fan_in = 3*t*p*p, fan_out = E
    k = params["patch_embed/proj/kernel"]
    assert k.shape == (2, 16, 16, 3, 768)
    bound = np.sqrt(6 / (3 * 2 * 16 * 16 + 768))
    assert np.abs(k).max() <= bound
    assert np.abs(k).max() > 0.99 * bound
    assert abs(k.std() / (bound / np.sqrt(3)) - 1) < 0.02
    # its bias: PyTorch's Conv3d default U(+-1/sqrt(fan_in)), left as it is by the reference
    b, bound = params["patch_embed/proj/bias"], 1 / np.sqrt(3 * 2 * 16 * 16)
    assert 0.95 * bound < np.abs(b).max() <= bound and abs(b.std() / (bound / np.sqrt(3)) - 1) < 0.1
    # a block's Linear: xavier-uniform on [in, out]
    q = params["blocks/0/attn/q/kernel"]
    assert q.shape == (768, 768) and "blocks/1/attn/q/kernel" not in params
    bound = np.sqrt(6 / (768 + 768))
    assert np.abs(q).max() <= bound
    assert abs(q.std() / (bound / np.sqrt(3)) - 1) < 0.02


def test_init_tiny_kernels():
    params = flat_params(make_model())
    k = params["patch_embed/proj/kernel"]  # fan_in 3*2*8*8 = 384, fan_out 64
    assert k.shape == (2, 8, 8, 3, 64)
    bound = np.sqrt(6 / (384 + 64))
    assert bound * 0.99 < np.abs(k).max() <= bound
    assert abs(k.std() / (bound / np.sqrt(3)) - 1) < 0.03
    fc1 = np.stack([params[f"blocks/{i}/mlp/fc1/kernel"] for i in range(2)])  # [depth, 64, 256]
    assert fc1.shape == (2, 64, 256) and "blocks/2/mlp/fc1/kernel" not in params
    bound = np.sqrt(6 / (64 + 256))
    assert bound * 0.98 < np.abs(fc1).max() <= bound
    assert abs(fc1.std() / (bound / np.sqrt(3)) - 1) < 0.05
    # the two blocks are initialised independently
    assert not np.array_equal(fc1[0], fc1[1])
    pred = params["decoder_pred/kernel"]
    assert pred.shape == (32, 8 * 8 * 3)
    assert np.abs(pred).max() <= np.sqrt(6 / (32 + 192))


def test_init_zeros_and_ones():
    params = flat_params(make_model())
    np.testing.assert_array_equal(params["decoder_cls_token"], 0)
    assert params["decoder_cls_token"].shape == (1, 1, 32)
    n_scale = n_bias = 0
    for name, v in params.items():
        leaf = name.split("/")[-1]
        if leaf == "scale":
            n_scale += 1
            np.testing.assert_array_equal(v, 1, err_msg=name)
        elif leaf == "bias" and name != "patch_embed/proj/bias":  # that one: PyTorch's conv default
            n_bias += 1
            np.testing.assert_array_equal(v, 0, err_msg=name)
    # norm1, norm2 in each of the 2 + 1 blocks, norm, decoder_norm
    assert n_scale == 2 * 3 + 1 + 1
    # (q, k, v, proj, fc1, fc2) * 3 blocks, norms (8), decoder_embed, decoder_pred (not patch_embed)
    assert n_bias == 6 * 3 + 8 + 2
    mt = params["mask_token"]
    assert mt.shape == (1, 1, 32) and 0 < mt.std() < 0.05


# ----------------------------------------------------------------------------------------------
# shapes, dtypes, remat / scan


@pytest.mark.parametrize("pred_t_dim,u", [(NUM_FRAMES // 2, 1), (NUM_FRAMES, 2)])
def test_pred_shape(pred_t_dim, u):
    model = make_model(pred_t_dim=pred_t_dim)
    assert model.t_pred_patch == u
    loss, pred, mask = apply(model, video(12), noise_for(model))
    assert pred.shape == (B, 64, u * 8 * 8 * 3)
    assert mask.shape == (B, 64)
    assert loss.shape == () and np.isfinite(float(loss))


def test_bad_pred_t_dim_raises():
    with pytest.raises(ValueError, match="pred_t_dim"):
        make_model(pred_t_dim=3)
    with pytest.raises(ValueError, match="pred_t_dim"):
        make_model(pred_t_dim=2)  # u = 2 * 2 / 8 is not an integer


def test_bfloat16_close_to_float32():
    vid = video(13)
    m32 = make_model()
    m16 = make_model(dtype="bfloat16")
    noise = noise_for(m32)
    l32, p32, _ = apply(m32, vid, noise)
    l16, p16, _ = apply(m16, vid, noise)
    assert p16.dtype == jnp.float32
    assert np.isfinite(float(l16))
    assert abs(float(l16) / float(l32) - 1) < 0.05, (float(l16), float(l32))
    # and really computed in bfloat16: not bit-identical
    assert float(l16) != float(l32)


def test_remat_and_scan_match_default():
    vid = video(14)
    base = make_model()
    noise = noise_for(base)
    l0, g0 = loss_and_grads(base, vid, noise)
    flat0 = traverse_util.flatten_dict(g0)
    scale = max(float(np.abs(np.asarray(v)).max()) for v in flat0.values())
    assert scale > 1e-3
    # every block parameter gets a gradient (nothing dropped by the scan over layers)
    block_leaves = [k for k in flat0 if k[0] in ("blocks", "decoder_blocks")]
    assert len(block_leaves) == (2 + 1) * 16 and {k[1] for k in block_leaves} == {0, 1}  # 2 + 1 blocks x 16 leaves
    for k in block_leaves:
        if k[-2:] != ("k", "bias"):  # k's bias: softmax-invariant
            assert np.abs(np.asarray(flat0[k])).max() > 0, k
    for kw in (dict(remat="full"), dict(scan_layers=True)):
        l1, g1 = loss_and_grads(make_model(**kw), vid, noise)
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, err_msg=str(kw))
        flat1 = traverse_util.flatten_dict(g1)
        assert set(flat1) == set(flat0)
        for k in flat0:  # within 1e-5 of the gradients' scale
            np.testing.assert_allclose(np.asarray(flat1[k]), np.asarray(flat0[k]), rtol=1e-5, atol=1e-5 * scale,
                                       err_msg=f"{kw} {k}")


def test_attention_chunk_size_follows_the_l2_cache(tmp_path):
    for index, (level, size) in enumerate([("1", "48K"), ("2", "2048K"), ("3", "260M")]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(level + "\n")
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert layers.l2_cache_bytes(str(tmp_path)) == 2 << 20
    assert layers.l2_cache_bytes(str(tmp_path / "missing")) is None
    assert layers.chunk_elements_for(2 << 20) == 1 << 21
    assert layers.chunk_elements_for(None) == 1 << 19
    assert layers.chunk_elements_for(64 << 20) == 1 << 22  # capped
    # the decoder's 4 x 16 (sample, head) pairs of 393 tokens: 8 pairs per step with a 2 MiB L2
    assert layers._attention_chunk(64, 393) >= 1
    old = layers.ATTENTION_CHUNK_ELEMENTS
    try:
        layers.ATTENTION_CHUNK_ELEMENTS = 1 << 21
        assert layers._attention_chunk(64, 393) == 8
        layers.ATTENTION_CHUNK_ELEMENTS = 1 << 19
        assert layers._attention_chunk(64, 393) == 2
    finally:
        layers.ATTENTION_CHUNK_ELEMENTS = old


@pytest.mark.parametrize("n,multiple", [(13, 16), (157, 16), (16, 16), (9, 2)])
def test_padded_attention_equals_unpadded(n, multiple):
    # cudnn_attention pads N up to a multiple and masks the padding by sequence lengths; run with
    # XLA's implementation (cuDNN needs a GPU) the values and all three gradients must equal plain
    # attention on the unpadded sequence: no padded key gets weight, no padded query leaks gradient.
    q, k, v, g = (jax.random.normal(s, (2, n, 4, 8)) for s in jax.random.split(jax.random.key(n), 4))

    def value_and_grads(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * g), (0, 1, 2))(q, k, v)

    padded = value_and_grads(functools.partial(layers.cudnn_attention, multiple=multiple, implementation="xla"))
    plain = value_and_grads(lambda *t: jax.nn.dot_product_attention(*t, implementation="xla"))
    for got, want in zip(jax.tree.leaves(padded), jax.tree.leaves(plain)):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = layers.cudnn_attention(q, k, v, multiple=multiple, implementation="xla")
    np.testing.assert_allclose(np.asarray(out), np.einsum("bhqk,bkhd->bqhd", probs, v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk_elements", [1, 13 * 13 * 3, 1 << 21])
def test_chunked_softmax_attention_values_and_grads(chunk_elements):
    # softmax_attention's chunks of (sample, head) pairs and its hand-written backward against the
    # written-out softmax, autodiff'd: 1 pair per loop step, 3 pairs (12 pairs in 4 steps), all 12
    q, k, v, g = (jax.random.normal(jax.random.key(i), (3, 13, 4, 8)) for i in range(4))
    scale = 8 ** -0.5

    def plain(q, k, v):
        p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    old = layers.ATTENTION_CHUNK_ELEMENTS
    try:
        layers.ATTENTION_CHUNK_ELEMENTS = chunk_elements
        assert layers._attention_chunk(12, 13) == {1: 1, 13 * 13 * 3: 3, 1 << 21: 12}[chunk_elements]
        out, vjp = jax.vjp(lambda q, k, v: layers.softmax_attention(q, k, v, scale), q, k, v)
        grads = vjp(g)
    finally:
        layers.ATTENTION_CHUNK_ELEMENTS = old
    want, want_vjp = jax.vjp(plain, q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, want_vjp(g)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-5)


def test_attention_impl_auto_on_cpu_is_the_chunked_softmax():
    # '' must not route to cuDNN off NVIDIA GPUs; on CPU it is softmax_attention, equal to 'reference'
    x = jax.random.normal(jax.random.key(3), (2, 13, 32))
    auto = layers.Attention(32, 4, qkv_bias=True, attention_impl="", dtype=jnp.float32,
                            param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ref = layers.Attention(32, 4, qkv_bias=True, attention_impl="reference", dtype=jnp.float32,
                           param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert not layers._on_cuda()
    np.testing.assert_allclose(np.asarray(auto(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-6)
