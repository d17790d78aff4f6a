"""Orbax checkpoints: the training CheckpointManager (async, keep-N, auto-resume) and
stand-alone parameter checkpoints (`params/` + `model.json`) that `config.init_from` reads."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

PARAMS_DIR, MODEL_JSON = "params", "model.json"


def manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
            cleanup_tmp: bool = False) -> ocp.CheckpointManager:
    """CheckpointManager over `workdir/checkpoints`; only committed steps are listed. `cleanup_tmp`: delete
    the uncommitted step folders a crash or a full disk left (only for the run that owns the workdir:
    another run's may be saving)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=cleanup_tmp)
    mgr = ocp.CheckpointManager(absolute(workdir) / "checkpoints", options=options)
    if cleanup_tmp:
        # Orbax deletes them from a thread that close() does not wait for (only the next save does): a
        # second manager on the workdir (the resume path makes three) deleted the same folders at the same
        # time (FileNotFoundError tracebacks in the log), and an exit soon after (a start-up error) printed
        # one from interpreter shutdown. Done before this returns instead.
        wait = getattr(mgr, "_maybe_await_cleanup_tmp_directory", None)  # private: absent in some versions
        if wait is not None:
            wait()
    return mgr


def absolute(path: str) -> epath.Path:
    """Orbax wants absolute paths: resolve local relative ones (gs://... stays as is)."""
    return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def save_state(mgr: ocp.CheckpointManager, step: int, state, *, force: bool = False) -> bool:
    return mgr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_state(mgr: ocp.CheckpointManager, step: int, abstract_state):
    """Restore onto the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    return mgr.restore(step, args=ocp.args.StandardRestore(abstract_state))


def _state_target(mgr: ocp.CheckpointManager, step: int):
    """Zero host arrays shaped like training checkpoint `step` (from its metadata): a restore
    target that reads it to host memory whatever devices it was saved from."""
    with ocp.StandardCheckpointer() as ckptr:
        return _host_target(ckptr, absolute(str(mgr.directory)) / str(step) / "default")


def has_stacked_blocks(mgr: ocp.CheckpointManager, step: int) -> bool:
    """Whether checkpoint `step` holds its blocks stacked on a [depth] axis (written before the
    blocks were stored per layer)."""
    params = _state_target(mgr, step).get("params", {})
    return isinstance(params, dict) and _is_stacked(params.get("blocks"))


def newest_readable(make_manager, restore, where: str = ""):
    """(restore(mgr, step), step, unreadable newer steps) for the newest committed step `restore`
    reads, or (None, None, every step) when none does; each failure is a warning (prefixed `where`).
    Every attempt gets its own CheckpointManager (make_manager()): a failed restore of an item-less
    step folder leaves Orbax's manager unable to restore any other step."""
    probe = make_manager()
    try:
        steps = sorted(probe.all_steps(), reverse=True)
        directory = probe.directory
    finally:
        probe.close()
    unreadable = []
    for step in steps:
        mgr = make_manager()
        try:
            return restore(mgr, step), step, unreadable
        except Exception as e:  # a corrupt or truncated checkpoint: fall back to the one before
            logging.warning("%sCheckpoint step %d in %s cannot be restored (%s: %s); trying the previous one",
                            where, step, directory, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            unreadable.append(step)
        finally:
            mgr.close()
    return None, None, unreadable


def describe_restore_failure(mgr: ocp.CheckpointManager, step: int, abstract_state, error: Exception) -> Exception:
    """`error` from restoring `step`, with the leaves that differ between the checkpoint (its metadata)
    and the train state named when the metadata reads: Orbax's own message stops at 'tree structures do
    not match'."""
    try:
        target = _state_target(mgr, step)
    except Exception:
        target = None
    if target is None:
        return error
    problems = tree_mismatches(target, abstract_state)
    if not problems:
        return error
    return ValueError(f"it does not fit this run's train state ({len(problems)} differences: "
                      f"{'; '.join(problems[:4])})")


def tree_mismatches(tree, expected) -> list[str]:
    """'missing P', 'unexpected P' and 'P: checkpoint SHAPE vs model SHAPE' for every leaf path P
    (jax keystr) whose presence or shape differs between `tree` (read from a checkpoint) and
    `expected` (the model's or train state's tree)."""
    got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: checkpoint {got[k]} vs model {want[k]}" for k in sorted(set(got) & set(want))
                 if got[k] != want[k]]
    return problems


def restore_stacked_state(mgr: ocp.CheckpointManager, step: int, abstract_state):
    """Restore a train state whose blocks (parameters and AdamW moments) were saved stacked on a
    [depth] axis: read it to host memory, split the blocks per layer, check every leaf against
    `abstract_state` and place it on that state's shardings. The next save writes the per-layer
    layout. Raises ValueError when the converted tree still does not fit."""
    raw = jax.tree.map(np.asarray, mgr.restore(step, args=ocp.args.StandardRestore(_state_target(mgr, step))))
    opt = abstract_state["opt_state"]
    raw_opt = raw["opt_state"]
    if hasattr(opt, "_fields") and isinstance(raw_opt, dict):  # a NamedTuple (AdamWState) saved as a dict
        raw_opt = type(opt)(**{f: per_layer_blocks(raw_opt[f]) for f in opt._fields})
    state = {**raw, "params": per_layer_blocks(raw["params"]), "opt_state": raw_opt}
    problems = tree_mismatches(state, abstract_state)
    if problems:
        raise ValueError(f"checkpoint step {step} does not fit this run's state after splitting its stacked "
                         f"blocks: {'; '.join(problems[:6])}")
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(state)}
    leaves = [jax.device_put(np.asarray(got[jax.tree_util.keystr(k)], a.dtype), a.sharding)
              for k, a in jax.tree_util.tree_leaves_with_path(abstract_state)]
    return jax.tree.unflatten(jax.tree.structure(abstract_state), leaves)


def save_params(directory: str, params, model_config: dict) -> None:
    """Write a parameter-only checkpoint: `directory/params` (Orbax) and `directory/model.json`."""
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(absolute(str(path / PARAMS_DIR)), params, force=True)
        ckptr.wait_until_finished()
    (path / MODEL_JSON).write_text(json.dumps(_jsonable(model_config), indent=2, sort_keys=True))


def load_params(directory: str, abstract_params=None):
    """(params, model_config) from `save_params`' layout or from a training workdir (latest step).

    With `abstract_params` (a tree of ShapeDtypeStruct, optionally sharded) the arrays are
    restored onto those shardings; without it they come back as host numpy arrays.
    """
    path = epath.Path(directory)
    model_config = json.loads((path / MODEL_JSON).read_text()) if (path / MODEL_JSON).exists() else {}
    if (path / PARAMS_DIR).exists():
        with ocp.StandardCheckpointer() as ckptr:
            if abstract_params is not None:
                return ckptr.restore(absolute(str(path / PARAMS_DIR)), abstract_params), model_config
            params = ckptr.restore(absolute(str(path / PARAMS_DIR)), _host_target(ckptr, path / PARAMS_DIR))
            return per_layer_blocks(params), model_config
    if (path / "checkpoints").exists():
        def read(mgr, step):
            if abstract_params is None:  # host numpy arrays, whatever devices the checkpoint was saved from
                item = {"params": _state_target(mgr, step)["params"]}
                restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            else:
                item, restore_args = {"params": abstract_params}, None
            return mgr.restore(step, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                 partial_restore=True))

        restored, _, unreadable = newest_readable(lambda: manager(str(path), async_save=False), read,
                                                  f"init_from={directory}: ")
        if restored is None and not unreadable:
            raise FileNotFoundError(f"init_from={directory}: no committed checkpoint under {path / 'checkpoints'}")
        if restored is None:
            raise FileNotFoundError(f"init_from={directory}: none of its checkpoints "
                                    f"({', '.join(map(str, unreadable))}) can be read (the warnings above say why)")
        params = restored["params"]
        if abstract_params is None:
            params = per_layer_blocks(jax.tree.map(np.asarray, params))
        return params, model_config
    raise FileNotFoundError(f"init_from={directory}: neither a parameter checkpoint ({PARAMS_DIR}/) "
                            f"nor a training workdir (checkpoints/)")


BLOCK_LISTS = ("blocks", "decoder_blocks")


def _is_stacked(blocks) -> bool:
    """A block subtree in the stacked layout (keyed by module names, not 0, 1, ...)."""
    return isinstance(blocks, dict) and bool(blocks) and not all(str(k).isdigit() for k in blocks)


def per_layer_blocks(params):
    """A host param tree in the current layout, one subtree per block under 'blocks' and
    'decoder_blocks' keyed 0, 1, ...: digit-string keys (a restore without a target returns
    those) become ints, and blocks stacked on a leading [depth] axis (how parameters were saved
    before the blocks were split per layer) are split into layers."""
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        if key in BLOCK_LISTS and _is_stacked(value):  # every leaf is [depth, ...]
            depth = jax.tree.leaves(value)[0].shape[0]
            value = {i: jax.tree.map(lambda a, i=i: np.asarray(a)[i], value) for i in range(depth)}
        elif key in BLOCK_LISTS and isinstance(value, dict):  # '0', '1', ... -> 0, 1, ...
            value = {int(k): per_layer_blocks(v) for k, v in value.items()}
        elif isinstance(value, dict):
            value = per_layer_blocks(value)
        out[key] = value
    return out


def _host_target(ckptr, path):
    meta = ckptr.metadata(absolute(str(path)))
    meta = getattr(meta, "item_metadata", meta)
    return jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
