"""The jitted pre-training step: normalise, mask, forward, loss, gradient (accumulated), AdamW."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mae_st_jax.models.mae import decoder_table_separate
from mae_st_jax.train import checkpoint, optim
from mae_st_jax.train import sharding as shd


def normalize(video_uint8: jax.Array, mean, std) -> jax.Array:
    """uint8 [.., 3] -> float32 (x / 255 - mean) / std, on device."""
    x = video_uint8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def create_state(model_fn, tx, mesh, config, params=None):
    """(graphdef, state, state_shardings); the state is born sharded (jit with out_shardings).

    model_fn(rngs) builds the NNX model. `params` (a host tree) replaces the fresh init.
    """
    abstract_model = nnx.eval_shape(lambda: model_fn(nnx.Rngs(params=config.seed)))
    graphdef, _ = nnx.split(abstract_model, nnx.Param)

    def init_with(p):
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p),
                "nonfinite_steps": jnp.zeros((), jnp.int32)}

    def init():
        return init_with(nnx.to_pure_dict(nnx.split(model_fn(nnx.Rngs(params=config.seed)), nnx.Param)[1]))

    abstract = jax.eval_shape(init)
    shardings = shd.tree_shardings(abstract, mesh, config.param_sharding, config.sharding_rules,
                                   config.fsdp_min_size)
    if params is None:
        state = jax.jit(init, out_shardings=shardings)()
        return graphdef, state, shardings
    check_params_match(params, abstract["params"])
    state = jax.jit(init_with, out_shardings=shardings)(params)
    return graphdef, state, shardings


def check_params_match(params, expected) -> None:
    """Raise a ValueError naming every parameter whose presence or shape differs from the model's."""
    problems = checkpoint.tree_mismatches(params, expected)
    if problems:
        raise ValueError("config.init_from does not fit config.model (check sizes, patch, frames, "
                         "cls_embed, sep_pos_embed): " + "; ".join(problems[:12]))


UNSHAPED_SETTINGS = ("num_heads",)  # settings a classifier's parameter shapes cannot show
UNSHAPED_MAE_SETTINGS = UNSHAPED_SETTINGS + ("decoder_num_heads", "decoder_cls", "decoder_pos_table", "target_frames")
SHAPED_SETTINGS = ("embed_dim", "depth", "decoder_embed_dim", "decoder_depth")  # check_params_match names these


def _effective(model: dict, name: str):
    """A setting as the model it builds sees it: the decoder's pos table as 'separate' or 'joint' (its 'same'
    follows sep_pos_embed), decoder_cls only with a class token."""
    value = model.get(name)
    if name == "decoder_pos_table" and value is not None:
        return "separate" if decoder_table_separate(value, model.get("sep_pos_embed", True)) else "joint"
    if name == "decoder_cls" and not model.get("cls_embed", True):
        return None
    return value


def check_saved_settings(saved_model: dict, model_config, path: str, names=UNSHAPED_SETTINGS) -> None:
    """Raise a ValueError when `path`'s model.json and config.model disagree on one of `names` (num_heads; for
    pre-training also the decoder's heads, class token and pos table and the target frames): these change no
    parameter shape, or not one that says which setting differs, so check_params_match cannot name them, but
    the model would differ. A setting model.json lacks (written before it existed) is not checked, nor any when
    the widths or depths differ (check_params_match names those first)."""
    wanted_model = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config or {})
    if any(saved_model.get(k) is not None and wanted_model.get(k) is not None
           and int(saved_model[k]) != int(wanted_model[k]) for k in SHAPED_SETTINGS):
        return
    for name in names:
        saved, wanted = _effective(saved_model, name), _effective(wanted_model, name)
        if saved is None or wanted is None or str(saved) == str(wanted):
            continue
        raise ValueError(f"config.init_from={path} has {name}={saved_model[name]} (its model.json), "
                         f"config.model.{name}={wanted_model[name]}: set --config.model.{name}={saved_model[name]} "
                         f"(the parameter shapes cannot show it)")


def abstract_with_shardings(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def accumulate_gradients(loss_fn, params, micro_batches, key):
    """Mean loss and gradients of loss_fn(params, micro_batch, key) over the leading [A] axis of
    every array in `micro_batches`; micro-batch i gets fold_in(key, i)."""
    grad_fn = jax.value_and_grad(loss_fn)
    n = jax.tree.leaves(micro_batches)[0].shape[0]
    if n == 1:
        return grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches), jax.random.fold_in(key, 0))

    def micro(carry, xs):
        batch, i = xs
        loss, grads = grad_fn(params, batch, jax.random.fold_in(key, i))
        return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(micro, zeros, (micro_batches, jnp.arange(n)))
    return loss / n, jax.tree.map(lambda g: g / n, grads)


def inject_nan(config, state, loss, grads):
    """Fault injection for tests: a NaN loss and gradient at steps (0-based counter)
    config.debug.inject_nan_at_step .. + inject_nan_count - 1; the identity when the step is < 0."""
    first = config.debug.inject_nan_at_step
    if first < 0:
        return loss, grads
    count = config.debug.inject_nan_count
    hit = (state["step"] >= first) & (state["step"] < first + count)
    poison = jnp.where(hit, jnp.nan, 0.0)
    return loss + poison, jax.tree.map(lambda g: g + poison, grads)


def apply_gradients(state, loss, grads, tx, schedule, skip_nonfinite: bool):
    """(new state, metrics) after one AdamW update; a non-finite loss or gradient leaves the state
    unchanged (and is counted) when `skip_nonfinite`, else the loop stops on `finite`."""
    grad_norm = optim.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if isinstance(tx, optax.GradientTransformationExtraArgs):  # ours (optim.adamw): reuse the norm
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"], grad_norm=grad_norm,
                                       step=state["step"])  # the lr follows the step, skipped ones included
    else:
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
    if skip_nonfinite:
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new,
                           {"params": state["params"], "opt_state": state["opt_state"]})
    skipped = state["nonfinite_steps"] + (~finite).astype(jnp.int32)
    new.update(step=state["step"] + 1, nonfinite_steps=skipped)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]), "finite": finite,
               "nonfinite_steps": skipped}
    return new, metrics


def make_pretrain_step(graphdef, tx, schedule, mesh, config, state_shardings):
    """jit(step)(state, batch) -> (state, metrics); batch['video'] is uint8 [A, B/A, T, H, W, C]."""
    mean, std = tuple(config.data.mean), tuple(config.data.std)
    micro_sharding = NamedSharding(mesh, P(shd.BATCH_AXES))
    seed = config.seed

    def loss_fn(params, video, key):
        model = nnx.merge(graphdef, params)
        video = jax.lax.with_sharding_constraint(normalize(video, mean, std), micro_sharding)
        loss, _, _ = model(video, key=key)
        return loss

    def step(state, batch):
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        loss, grads = accumulate_gradients(loss_fn, state["params"], batch["video"], key)
        loss, grads = inject_nan(config, state, loss, grads)
        return apply_gradients(state, loss, grads, tx, schedule, config.skip_nonfinite)

    batch_sh = {"video": shd.batch_sharding(mesh, 6)}
    return jax.jit(step, in_shardings=(state_shardings, batch_sh),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))
