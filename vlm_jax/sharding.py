"""Device mesh, logical-axis rules and the shardings of train state and batches.

The mesh always has the three axes ('data', 'fsdp', 'tensor'); one device is a 1x1x1 mesh.
Parameters carry logical axis names (docs/interfaces.md); `LOGICAL_RULES` maps them to mesh
axes. Batches are split over ('data', 'fsdp') on their leading dimension.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
    ("hidden", "tensor"),
    ("positions", None),
    ("queries", None),
    ("latents", None),
    ("layers", None),          # stacked (scanned) layer axis
)


def create_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
    """Mesh of `shape` = {'data': d, 'fsdp': f, 'tensor': t} over the first d*f*t devices.

    Axis types are Auto (jax>=0.10 defaults to Explicit, under which a matmul over a sharded
    contraction dimension raises ShardingTypeError).
    """
    devices = jax.devices() if devices is None else devices
    n = int(np.prod([shape[a] for a in MESH_AXES]))
    try:
        from jax.experimental import mesh_utils
        dev = mesh_utils.create_device_mesh(tuple(shape[a] for a in MESH_AXES), devices=devices[:n])
    except Exception:  # non-TPU topologies the helper does not know: plain reshape
        dev = np.asarray(devices[:n]).reshape(tuple(shape[a] for a in MESH_AXES))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(dev, MESH_AXES, axis_types=auto)


def restrict_rules(rules, mesh: Mesh) -> list:
    """Drop mesh axes that `mesh` does not have (e.g. a user mesh with only 'data')."""
    names = set(mesh.axis_names)
    out = []
    for logical, phys in rules:
        if phys is None:
            out.append((logical, None))
            continue
        kept = tuple(a for a in ((phys,) if isinstance(phys, str) else tuple(phys)) if a in names)
        out.append((logical, kept if len(kept) > 1 else (kept[0] if kept else None)))
    return out


def fit_spec(shape, spec: P, mesh: Mesh, name: str = "") -> P:
    """Replicate every dimension that its mesh axes do not divide.

    Keeps tiny test models (widths 16) and odd vocabularies shardable on any mesh; logged at
    debug level with the parameter name.
    """
    out = []
    for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        if dim % size:
            log.debug("%s: dim %d (size %d) not divisible by mesh axes %s (size %d); replicated.",
                      name, i, dim, names, size)
            out.append(None)
        else:
            out.append(axes)
    return P(*out)


def shardings_for(abstract_tree, logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for `abstract_tree` (arrays / ShapeDtypeStructs) from its logical PartitionSpecs.

    `logical_specs` is `nn.get_partition_spec(boxed_tree)`: same structure, a PartitionSpec of
    logical names per leaf (P() for unannotated leaves).
    """
    mesh_specs = nn.logical_to_mesh(logical_specs, restrict_rules(rules, mesh))

    def one(path, x, spec):
        spec = spec if isinstance(spec, P) else P()
        return NamedSharding(mesh, fit_spec(x.shape, spec, mesh, jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(one, abstract_tree, mesh_specs,
                                            is_leaf=lambda s: isinstance(s, P) or s is None)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy batch -> global jax arrays split over the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}
