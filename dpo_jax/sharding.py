"""Device mesh and logical-axis sharding rules -> NamedShardings for params, optimizer state and batches.

Mesh axes are `data`, `fsdp` and `tensor` (sizes from config, one may be -1 = fill), optionally times cross-slice
(DCN) sizes for multi-slice TPU. The model names its parameter axes logically (embed, mlp, heads, ...); the rules
in config map those names to mesh axes through flax's `logical_to_mesh_axes` / `logical_to_mesh_sharding`. What is
added here is refusing mistakes before compilation, with what to change: a logical name without a rule (flax
would silently replicate it), a rule naming no mesh axis, a dimension the mesh does not divide.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = "batch"
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def default_mesh_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data, c.fsdp, c.tensor = -1, 1, 1  # per slice (ICI); one may be -1
    c.dcn_data, c.dcn_fsdp, c.dcn_tensor = 1, 1, 1  # across slices (multi-slice TPU)
    c.rules = DEFAULT_RULES
    return c


def _resolve(sizes: Sequence[int], total: int, what: str) -> list[int]:
    sizes = list(sizes)
    if sizes.count(-1) > 1:
        raise ValueError(f"{what}: at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if total % known:
            raise ValueError(f"{what}: {total} devices cannot fill {dict(zip(MESH_AXES, sizes))}; the product of "
                             f"the fixed axes ({known}) must divide {total}")
        sizes[sizes.index(-1)] = total // known
    if math.prod(sizes) != total or min(sizes) < 1:
        raise ValueError(f"{what}: mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but there are "
                         f"{total}; make data x fsdp x tensor = {total} (or set one axis to -1)")
    return sizes


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    dcn = [config.dcn_data, config.dcn_fsdp, config.dcn_tensor]
    if math.prod(dcn) > 1:
        slices = math.prod(dcn)
        if len(devices) % slices:
            raise ValueError(f"mesh: {len(devices)} devices do not split into {slices} slices (dcn_* sizes)")
        ici = _resolve([config.data, config.fsdp, config.tensor], len(devices) // slices, "mesh (per slice)")
        array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        ici = _resolve([config.data, config.fsdp, config.tensor], len(devices), "mesh")
        try:
            array = mesh_utils.create_device_mesh(ici, devices)
        except (ValueError, NotImplementedError, AssertionError):  # e.g. CPU devices without a physical topology
            array = np.asarray(devices).reshape(ici)
    return Mesh(array, MESH_AXES)


def _rules(rules: Any) -> tuple[tuple[str, Any], ...]:
    """Config rules (lists from JSON or overrides) -> flax's ((logical name, mesh axes), ...), checked."""
    out = []
    for name, axes in rules:
        if axes is not None:
            for a in (axes,) if isinstance(axes, str) else axes:
                if a not in MESH_AXES:
                    raise ValueError(f"sharding rule {name!r} -> {axes!r}: {a!r} is not a mesh axis {MESH_AXES}")
        out.append((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes))
    return tuple(out)


def mesh_spec(logical: Sequence[str | None], rules: Any) -> PartitionSpec:
    """Logical axis names ('embed', 'heads', ...) -> mesh PartitionSpec via the rules (unknown names: error)."""
    table = _rules(rules)
    known = {name for name, _ in table}
    for name in logical:
        if name is not None and name not in known:
            raise ValueError(f"no sharding rule for logical axis {name!r}; add it to mesh.rules")
    return nn.logical_to_mesh_axes(tuple(logical), table)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def check_divisible(path: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, logical=None) -> None:
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        n = _axis_size(mesh, axes)
        if size % n:
            name = f" ({logical[dim]})" if logical is not None and dim < len(logical) else ""
            raise ValueError(f"{path}: dimension {dim}{name} of size {size} is not divisible by mesh axes {axes} "
                             f"(size {n}); change the mesh sizes or the sharding rule for that axis")


def param_shardings(logical_axes: Any, shapes: Any, mesh: Mesh, rules: Any) -> Any:
    """NamedSharding per parameter from the model's logical axes; refuses dimensions the mesh does not divide."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731

    def check(path, logical, shape):
        check_divisible(jax.tree_util.keystr(path), shape.shape, mesh_spec(logical, rules), mesh, logical)

    jax.tree_util.tree_map_with_path(check, logical_axes, shapes, is_leaf=is_spec)
    return nn.logical_to_mesh_sharding(logical_axes, mesh, _rules(rules))


def state_shardings(abstract_state: Any, params_shardings: Any, abstract_params: Any, mesh: Mesh) -> Any:
    """Shardings for a whole train state: any leaf whose path ends with a parameter's path and has its shape
    (params themselves, optax's mu/nu/trace) gets that parameter's sharding; everything else is replicated."""
    by_path = {}
    flat_shapes = dict(jax.tree_util.tree_flatten_with_path(abstract_params)[0])
    for path, sharding in jax.tree_util.tree_flatten_with_path(params_shardings)[0]:
        by_path[tuple(str(k) for k in path)] = (sharding, tuple(flat_shapes[path].shape))
    replicated = NamedSharding(mesh, PartitionSpec())
    param_depths = {len(p) for p in by_path}

    def one(path, leaf):
        keys = tuple(str(k) for k in path)
        for depth in param_depths:
            if len(keys) >= depth and keys[-depth:] in by_path:
                sharding, shape = by_path[keys[-depth:]]
                if tuple(leaf.shape) == shape:
                    return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_sharding(mesh: Mesh, rules: Any, ndim: int = 2) -> NamedSharding:
    """Rows over the batch axes, everything else replicated."""
    return NamedSharding(mesh, mesh_spec((BATCH,) + (None,) * (ndim - 1), rules))


def data_parallel_size(mesh: Mesh, rules: Any) -> int:
    return _axis_size(mesh, mesh_spec((BATCH,), rules)[0])


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules: Any) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global jax.Arrays sharded over the batch axes (multi-host: blocks in process
    order, via jax.make_array_from_process_local_data)."""
    shapes = abstract_global_batch(local, mesh, rules)
    return {k: jax.make_array_from_process_local_data(shapes[k].sharding, v, shapes[k].shape) for k, v in local.items()}


def on_mesh(fn: Any, mesh: Mesh) -> Any:
    """`fn` traced with `mesh` as the context's abstract mesh: what lets a Mosaic kernel inside (TPU pair attention,
    which XLA cannot partition) be shard_mapped over it. Wrap a jitted step's body with it."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return wrapped


def abstract_global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """`global_batch`'s result as stand-ins, no array made (compiling ahead; `dpo-jax plan` on abstract devices)."""
    return {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + v.shape[1:], v.dtype,
                                    sharding=batch_sharding(mesh, rules, v.ndim)) for k, v in local.items()}


def abstract(tree: Any, shardings: Any = None) -> Any:
    """Shape/dtype/sharding stand-ins for the arrays of `tree` (jax.ShapeDtypeStruct): what lowering, compiling
    ahead and restoring a checkpoint need. `shardings`: one sharding for every leaf, or a tree of them; default
    each array's own (None for a leaf that has none, e.g. an eval_shape result)."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
