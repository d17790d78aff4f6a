"""Orbax checkpoints: the training CheckpointManager (async, keep-N, auto-resume) and
stand-alone parameter checkpoints (`params/` + `model.json`) that `config.init_from` reads."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mae_st_jax import distributed
from mae_st_jax.train.errors import StepsDifferError

PARAMS_DIR, MODEL_JSON = "params", "model.json"
ITEM = "default"  # the folder of a CheckpointManager's one item inside a step folder


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
    return read_step(mgr, step, ocp.args.StandardRestore(abstract_state))


def read_step(mgr: ocp.CheckpointManager, step: int, args):
    """What mgr.restore(step, args=args) gives (StandardRestore or PyTreeRestore), read by the item's
    handler (_read) without the cross-process sync that Orbax's Checkpointer ends every restore with: a
    process whose read fails never reaches that sync, and the others then wait in it, or meet that process
    at its next sync of another name ('sync_global_devices name mismatch'). newest_readable has every
    process agree on each attempt's outcome instead."""
    return _read(_item_dir(mgr, step), args)


def _item_dir(mgr: ocp.CheckpointManager, step: int) -> epath.Path:
    return absolute(str(mgr.directory)) / str(step) / ITEM


def _read(directory, args):
    """Restore the checkpoint in `directory` with `args` through its Orbax handler: no cross-process sync."""
    handler = (ocp.PyTreeCheckpointHandler() if isinstance(args, ocp.args.PyTreeRestore)
               else ocp.StandardCheckpointHandler())
    try:
        return handler.restore(absolute(str(directory)), args=args)
    finally:
        handler.close()


def _metadata_target(directory):
    """_host_target of the checkpoint in `directory`, its metadata read by a handler (no cross-process sync)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        return _host_target(handler, directory)
    finally:
        handler.close()


def _state_target(mgr: ocp.CheckpointManager, step: int):
    """Zero host arrays shaped like training checkpoint `step` (from its metadata): a restore
    target that reads it to host memory whatever devices it was saved from."""
    return _metadata_target(_item_dir(mgr, step))


def has_stacked_blocks(mgr: ocp.CheckpointManager, step: int) -> bool:
    """Whether checkpoint `step` holds its blocks stacked on a [depth] axis (written before the
    blocks were stored per layer)."""
    params = _state_target(mgr, step).get("params", {})
    return isinstance(params, dict) and _is_stacked(params.get("blocks"))


def agreed_steps(mgr: ocp.CheckpointManager, where: str = "") -> list[int]:
    """mgr's committed steps, ascending, checked to be what every process lists: StepsDifferError when
    they differ (the workdir is not on storage they all share, e.g. /tmp on each host); the processes
    would otherwise start from different steps, or one afresh, and wait for each other for ever."""
    steps = sorted(mgr.all_steps())
    listed = distributed.differing("checkpoint steps", ",".join(map(str, steps)))
    if listed is not None:
        raise StepsDifferError(f"{where}the processes see different checkpoints in {mgr.directory} (steps "
                               f"{distributed.by_process(listed, 'none')}): every process needs the same workdir, "
                               f"on storage they all share")
    return steps


def newest_readable(mgr: ocp.CheckpointManager, restore, steps=None, where: str = ""):
    """(restore(mgr, step), step, unreadable newer steps) for the newest of `steps` (default: mgr's
    agreed_steps) that `restore` reads, or (None, None, every step) when none does; each failure is a
    warning (prefixed `where`). With several processes a step counts as read only when every process
    read its part (each reads its own shards, so one may fail alone): all of them resume from the same
    step or stop together. `restore` must not sync processes itself (read_step does not), and reads
    past the manager's own restore, so a failed attempt leaves `mgr` usable for the next."""
    if steps is None:
        steps = agreed_steps(mgr, where)
    unreadable = []
    for step in sorted(steps, reverse=True):
        restored, error = None, None
        try:
            restored = restore(mgr, step)
        except Exception as e:  # a corrupt or truncated checkpoint: fall back to the one before
            error = type(e).__name__ + ": " + (str(e).splitlines()[0][:300] if str(e) else "")
        message = distributed.first_error(f"restore of step {step}", error)
        if message is None:
            return restored, step, unreadable
        logging.warning("%sCheckpoint step %d in %s cannot be restored (%s); trying the previous one",
                        where, step, mgr.directory, message)
        unreadable.append(step)
        del restored  # a process that did read it frees that memory before the next attempt
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
    (names joined by '/') whose presence or shape differs between `tree` (read from a checkpoint) and
    `expected` (the model's or train state's tree). Paths are compared by their names: a checkpoint's
    metadata has dicts keyed '0', '1', ... where the state has a NamedTuple (AdamWState) and int keys."""
    got = {_path(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    want = {_path(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: checkpoint {got[k]} vs model {want[k]}" for k in sorted(set(got) & set(want))
                 if got[k] != want[k]]
    return problems


def _path(keys) -> str:
    """'opt_state/mu/blocks/0/attn/q/kernel' for a jax key path of dict keys, attributes or indices."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def restore_stacked_state(mgr: ocp.CheckpointManager, step: int, abstract_state):
    """Restore a train state whose blocks (parameters and AdamW moments) were saved stacked on a
    [depth] axis: read it to host memory, split the blocks per layer, check every leaf against
    `abstract_state` and place it on that state's shardings. The next save writes the per-layer
    layout. Raises ValueError when the converted tree still does not fit."""
    raw = jax.tree.map(np.asarray, read_step(mgr, step, ocp.args.StandardRestore(_state_target(mgr, step))))
    opt = abstract_state["opt_state"]
    raw_opt = raw["opt_state"]
    if hasattr(opt, "_fields") and isinstance(raw_opt, dict):  # a NamedTuple (AdamWState) saved as a dict
        raw_opt = type(opt)(**{f: per_layer_blocks(raw_opt[f]) for f in opt._fields})
    state = {**raw, "params": per_layer_blocks(raw["params"]), "opt_state": raw_opt}
    problems = tree_mismatches(state, abstract_state)
    if problems:
        raise ValueError(f"checkpoint step {step} does not fit this run's state after splitting its stacked "
                         f"blocks: {'; '.join(problems[:6])}")
    got = {_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(state)}
    # each process places only its own shards: jax.device_put onto a sharding that spans processes checks that
    # they all hold the same value with a device collective, which newest_readable's restore must not make
    leaves = [jax.make_array_from_callback(a.shape, a.sharding,
                                           lambda index, x=np.asarray(got[_path(k)], a.dtype): x[index])
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
    found = [name for name in (MODEL_JSON, PARAMS_DIR, "checkpoints") if (path / name).exists()]
    seen = distributed.differing("init_from contents", ",".join(found))  # the same branch on every process
    if seen is not None:
        raise FileNotFoundError(f"init_from={directory}: the processes find different things there "
                                f"({distributed.by_process(seen)}): it must be on storage every process reads")
    model_config, error = {}, None
    try:  # a file one process alone cannot read must not send it down another path than the others
        model_config = json.loads((path / MODEL_JSON).read_text()) if MODEL_JSON in found else {}
    except Exception as e:
        error = e
    message = distributed.first_error(f"init_from {MODEL_JSON}", error)
    if message is not None:
        raise ValueError(f"init_from={directory}: cannot read its {MODEL_JSON} ({message})") from error
    if PARAMS_DIR in found:
        params_dir = absolute(str(path / PARAMS_DIR))
        if not ocp.utils.is_checkpoint_finalized(params_dir):  # as Orbax's Checkpointer.restore checks
            raise FileNotFoundError(f"init_from={directory}: {PARAMS_DIR}/ is an incomplete checkpoint (its save "
                                    f"did not finish)")
        # read without a cross-process sync (read_step): the callers agree on the outcome
        if abstract_params is not None:
            return _read(params_dir, ocp.args.StandardRestore(abstract_params)), model_config
        params = _read(params_dir, ocp.args.StandardRestore(_metadata_target(params_dir)))
        return per_layer_blocks(params), model_config
    if "checkpoints" in found:
        def read(mgr, step):
            if abstract_params is None:  # host numpy arrays, whatever devices the checkpoint was saved from
                item = {"params": _state_target(mgr, step)["params"]}
                restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
            else:
                item, restore_args = {"params": abstract_params}, None
            return read_step(mgr, step, ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                               partial_restore=True))

        mgr = manager(str(path), async_save=False)
        try:
            restored, _, unreadable = newest_readable(mgr, read, where=f"init_from={directory}: ")
        finally:
            mgr.close()
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


def _host_target(reader, path):
    """Zero host arrays shaped like the checkpoint at `path`, from its metadata (`reader`: a Checkpointer or
    a handler)."""
    meta = reader.metadata(absolute(str(path)))
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
