"""One device mesh with axes ('data', 'fsdp') and a small regex rule table for parameter shardings."""

import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # the batch is split over both axes
RULE_TABLES = {
    # first matching regex (on the leaf's path, e.g. "params/blocks/attn/q/kernel") wins
    "replicate": ((".*", "replicate"),),
    "fsdp": ((".*", "fsdp"),),
}


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    """Mesh from {'data': n, 'fsdp': m}; one entry may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(mesh_config.get("data", -1)), int(mesh_config.get("fsdp", 1))]
    if shape.count(-1) > 1:
        raise ValueError("config.mesh: at most one of data/fsdp may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"config.mesh={dict(mesh_config)}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"config.mesh={dict(mesh_config)} needs {int(np.prod(shape))} devices, "
                         f"but {len(devices)} are present: set config.mesh.data=-1")
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh(tuple(shape), BATCH_AXES, axis_types=axis_types, devices=devices)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """For batches laid out [accum, batch, ...]: split the batch axis over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES, *([None] * (ndim - 2))))


def leading_batch_sharding(mesh, ndim: int) -> NamedSharding:
    """For arrays laid out [batch, ...] (no accumulation axis): split the batch over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def leaf_spec(path: str, shape, fsdp_size: int, rules, min_fsdp_size: int = 2 ** 12) -> P:
    """PartitionSpec of one leaf: 'replicate', or 'fsdp' = split its largest dim divisible by fsdp."""
    for pattern, action in rules:
        if re.fullmatch(pattern, path):
            break
    else:
        action = "replicate"
    if action == "replicate" or fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_fsdp_size:
        return P()
    if action != "fsdp":
        raise ValueError(f"sharding rule action {action!r} for {path}: use 'replicate' or 'fsdp'")
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh, param_sharding: str = "replicate", extra_rules=(), min_fsdp_size: int = 2 ** 12):
    """NamedShardings for every leaf (params and optimizer moments alike, by path and shape)."""
    if param_sharding not in RULE_TABLES:
        raise ValueError(f"config.param_sharding={param_sharding!r}: choose one of {sorted(RULE_TABLES)}")
    rules = tuple(tuple(r) for r in extra_rules) + RULE_TABLES[param_sharding]
    fsdp_size = mesh.shape["fsdp"]

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, leaf_spec(_path_str(path), shape, fsdp_size, rules, min_fsdp_size))

    return jax.tree_util.tree_map_with_path(one, tree)
