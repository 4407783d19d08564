"""Device mesh, logical-axis rules and the shardings of train state and batches.

The mesh always has the three axes ('data', 'fsdp', 'tensor'); one device is a 1x1x1 mesh.
Parameters carry logical axis names (docs/interfaces.md); `LOGICAL_RULES` maps them to mesh
axes. Batches are split over ('data', 'fsdp') on their leading dimension.
"""
from __future__ import annotations

import contextlib
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
    # Activations have their own names (MaxText's convention): a parameter's 'embed' dim is
    # FSDP-sharded, but an activation's must stay whole while its batch dim already uses the
    # 'fsdp' axis (one mesh axis cannot shard two dims of one array).
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
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


@contextlib.contextmanager
def rules_context(mesh: Mesh, rules=LOGICAL_RULES):
    """Trace under ``mesh`` and the logical axis rules, so that `nn.with_logical_constraint`
    calls in the model become real sharding constraints (without both, flax returns the input
    unchanged, silently). The trainer traces init, the train step and every evaluation here."""
    with jax.sharding.set_mesh(mesh), nn.logical_axis_rules(restrict_rules(rules, mesh)):
        yield


# Parameters at least this large (elements) that stay replicated on a sharded mesh axis are
# reported once (a dimension that does not divide the axis size).
LARGE_PARAM = 1 << 20
_reported: set = set()


def fit_spec(shape, spec: P, mesh: Mesh, name: str = "") -> P:
    """Replicate every dimension that its mesh axes do not divide.

    Keeps tiny test models (widths 16) and odd vocabularies shardable on any mesh; logged at
    debug level with the parameter name, and once at warning level for parameters of at least
    `LARGE_PARAM` elements (their memory is then repeated on every device of the axis).
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
            key = (name, tuple(shape), names)
            if int(np.prod(shape)) >= LARGE_PARAM and key not in _reported:
                _reported.add(key)
                log.warning("%s %s stays replicated over mesh axes %s: its dim %d (%d) does not divide their "
                            "size %d (pad the dimension or change the mesh to shard it).",
                            name, tuple(shape), names, i, dim, size)
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


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, axes: Mapping[str, tuple] | None = None,
                    rules=LOGICAL_RULES) -> dict:
    """NamedSharding per batch leaf from its logical axis names (``axes[key]``, e.g.
    ``('activation_batch', None, None)``); leaves without an entry are split over the batch axes
    on dim 0. A nested batch (a dict of per-source batches) gives a nested dict."""
    axes = axes or {}
    restricted = restrict_rules(rules, mesh)
    out = {}
    for k, v in batch.items():
        if isinstance(v, Mapping):
            out[k] = batch_shardings(v, mesh, axes.get(k), rules)
            continue
        names = axes.get(k)
        if names is None:
            out[k] = batch_sharding(mesh, np.ndim(v))
            continue
        if len(names) != np.ndim(v):
            raise ValueError(f"batch leaf {k!r} has {np.ndim(v)} dims but its logical axes {names} name "
                             f"{len(names)}; fix the task's batch_axes().")
        spec = nn.logical_to_mesh_axes(names, restricted)
        out[k] = NamedSharding(mesh, fit_spec(np.shape(v), spec, mesh, f"batch[{k!r}]"))
    return out


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_batch(batch: Mapping[str, Any], mesh: Mesh, shardings: Mapping[str, Any] | None = None) -> dict:
    """Process-local numpy batch (possibly nested) -> global jax arrays with ``shardings``
    (default: split over the batch axes on dim 0)."""
    out = {}
    for k, v in batch.items():
        sh = None if shardings is None else shardings.get(k)
        if isinstance(v, Mapping):
            out[k] = put_batch(v, mesh, sh)
        else:
            out[k] = jax.make_array_from_process_local_data(
                sh if sh is not None else batch_sharding(mesh, np.ndim(v)), np.asarray(v))
    return out
