"""Shared machinery to import Hugging Face safetensors checkpoints into Flax variables.

A converter (one per HF architecture, in `vision.py` / `text.py`) turns an HF
``config.json`` dict into a `Conversion`: the Flax module to build, example inputs to
trace its variable shapes, and a list of `Rule`s, each saying which file tensor(s) fill
which Flax variable and how (transpose, reshape to heads, split a fused qkv, ...).
`convert` then applies the rules strictly:

  * a rule naming a tensor the file lacks           -> ConversionError "missing key ..."
  * a file tensor no rule uses (and not ignored)     -> ConversionError "unexpected key ..."
  * a converted array whose shape differs from the
    module's variable                                -> ConversionError "shape mismatch ..."
  * a module variable that no rule fills             -> ConversionError "not filled ..."

`place` optionally puts the result onto a `jax.sharding.Mesh` using the modules' logical
axis names (`nn.logical_to_mesh_sharding`), so a large model never exists unsharded on one
device. Checkpoints are read with a small pure-numpy safetensors reader (bf16/fp8 via
ml_dtypes): no torch needed at import time.

Torch layouts -> Flax (helpers below): Linear weight ``(out, in)`` -> kernel ``(in, out)``
(`linear`); to attention heads ``(in, H, K)`` (`linear_to_heads`) / ``(H, K, out)``
(`linear_from_heads`); Conv2d ``(out, in, kh, kw)`` -> ``(kh, kw, in, out)`` (`conv`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import struct
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

log = logging.getLogger(__name__)

Path = tuple[str, ...]


class ConversionError(ValueError):
    """A checkpoint does not match the module it is being loaded into."""


# ------------------------------------------------------------------------ reading files
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy arrays (memory-mapped, read-only).

    A truncated or non-safetensors file raises `ConversionError` naming the file (and the
    tensor whose bytes are missing) instead of a numpy/struct error.
    """
    size = os.path.getsize(path)
    bad = f"{path} is not a complete safetensors file"
    fix = "re-download or re-save it with `save_pretrained(..., safe_serialization=True)`."
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConversionError(f"{bad} ({size} bytes); {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ConversionError(f"{bad}: its header claims {n} bytes but the file has {size}; {fix}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConversionError(f"{bad}: unreadable header ({e}); {fix}") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        if end > data.size or end - start != int(np.prod(info["shape"], dtype=np.int64)) * dtype.itemsize:
            raise ConversionError(f"{bad}: tensor {name!r} needs bytes {start}..{end} of the data section, "
                                  f"which has {data.size}; {fix}")
        arr = np.frombuffer(data[start:end], dtype=dtype)
        out[name] = arr.reshape(info["shape"])
    return out


def read_hf_dir(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config dict, {tensor name: array})`` from an HF model directory holding
    ``config.json`` and ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{path}: no config.json; point at a directory written by "
                              "`save_pretrained` (or downloaded from the HF hub).")
    with open(cfg_path) as f:
        config = json.load(f)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return config, read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            part = read_safetensors(os.path.join(path, shard))
            for k, v in part.items():
                if weight_map.get(k) != shard:
                    raise ConversionError(f"{path}: tensor {k!r} is in {shard} but the index says "
                                          f"{weight_map.get(k)!r}.")
                tensors[k] = v
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ConversionError(f"{path}: index lists tensors not found in any shard, e.g. {missing[:5]}.")
        return config, tensors
    raise ConversionError(f"{path}: neither model.safetensors nor model.safetensors.index.json found "
                          "(pytorch_model.bin is not supported: re-save with safe_serialization=True).")


# ----------------------------------------------------------------------- layout helpers
def linear(w):
    """torch Linear weight ``(out, in)`` -> Flax kernel ``(in, out)``."""
    return np.asarray(w).T


def linear_to_heads(num_heads: int) -> Callable:
    """torch ``(H*K, in)`` -> Flax attention kernel ``(in, H, K)``."""
    def f(w):
        w = np.asarray(w)
        return w.T.reshape(w.shape[1], num_heads, w.shape[0] // num_heads)
    return f


def bias_to_heads(num_heads: int) -> Callable:
    """``(H*K,)`` -> ``(H, K)``."""
    return lambda b: np.asarray(b).reshape(num_heads, -1)


def linear_from_heads(num_heads: int) -> Callable:
    """torch output projection ``(out, H*K)`` -> Flax kernel ``(H, K, out)``."""
    def f(w):
        w = np.asarray(w)
        return w.T.reshape(num_heads, w.shape[1] // num_heads, w.shape[0])
    return f


def conv(w):
    """torch Conv2d ``(out, in, kh, kw)`` -> Flax ``(kh, kw, in, out)``."""
    return np.asarray(w).transpose(2, 3, 1, 0)


def identity(x):
    return np.asarray(x)


def chunk(index: int, parts: int, axis: int = 0, then: Callable = identity) -> Callable:
    """Take piece ``index`` of ``parts`` equal pieces along ``axis`` (fused qkv), then ``then``."""
    def f(w):
        return then(np.split(np.asarray(w), parts, axis=axis)[index])
    return f


@dataclasses.dataclass(frozen=True)
class Rule:
    """Fill the variable at ``path`` (collection first, e.g. ``('params', 'layers_0', 'attn',
    'query', 'kernel')``) with ``transform(*[tensors[k] for k in hf_keys])``."""
    path: Path
    hf_keys: tuple[str, ...]
    transform: Callable = identity


def rule(path: str | Path, hf_keys: str | Sequence[str], transform: Callable = identity) -> Rule:
    """`Rule` from a '/'-separated path (no collection -> 'params') and one or more keys."""
    p = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
    if p[0] not in ("params", "batch_stats"):
        p = ("params",) + p
    keys = (hf_keys,) if isinstance(hf_keys, str) else tuple(hf_keys)
    return Rule(p, keys, transform)


@dataclasses.dataclass
class Conversion:
    """What a converter returns.

    module: the Flax module the checkpoint loads into.
    init_args: example inputs (arrays or ShapeDtypeStructs) for
      ``module.init(rng, *init_args, **init_kwargs)`` — only their shapes are used.
    init_kwargs: static (non-array) keyword arguments of that call.
    rules: the mapping, written for the unrolled layer layout ``layers_i``.
    ignore: regexes (``re.fullmatch``) of file tensors that are deliberately not used.
    stack: ``(path to the container, number of layers)`` pairs: when the module scans its
      layers (``scan_layers=True``), the converted ``layers_0..layers_{L-1}`` under that
      container are stacked into the scanned layout (`stack_layers`; the group size is read
      from the module's variables) before checking.
    """
    module: nn.Module
    init_args: tuple
    init_kwargs: dict = dataclasses.field(default_factory=dict)
    rules: list[Rule] = dataclasses.field(default_factory=list)
    ignore: tuple[str, ...] = ()
    stack: tuple[tuple[Path, int], ...] = ()


def abstract_variables(conversion: Conversion):
    """Boxed (logically partitioned) ShapeDtypeStruct tree of the module's variables."""
    def init(*args):
        return conversion.module.init(jax.random.key(0), *args, **conversion.init_kwargs)
    return jax.eval_shape(init, *conversion.init_args)


def scanned_layout(expected_paths, container: Path) -> tuple[int, int] | None:
    """The scanned layout of the stack under ``container`` as ``(group size N, insertions per
    group M)``, read from the module's variable paths; None when the stack is unrolled.

    ``<container>/layers/<block params>`` -> (1, 0); ``<container>/layers/block_j/...`` and
    ``<container>/layers/inserted_m/...`` -> (number of block_j, number of inserted_m).
    """
    k = len(container)
    subs = {p[2 + k] for p in expected_paths
            if len(p) > 2 + k and p[1:1 + k] == container and p[1 + k] == "layers"}
    if not subs:
        return None
    blocks = sum(bool(re.fullmatch(r"block_\d+", s)) for s in subs)
    inserts = sum(bool(re.fullmatch(r"inserted_\d+", s)) for s in subs)
    return (blocks, inserts) if blocks else (1, 0)


def stack_layers(flat: dict, container: Path, num_layers: int, group: int = 1, inserts_per_group: int = 0) -> dict:
    """Unrolled -> scanned layout (see `vlm_jax.layers.transformer`) on a flat
    ``{(collection, *path): array}`` dict: under ``container``, ``layers_i`` goes to
    ``layers/block_{i % N}`` at index ``i // N`` (to ``layers`` itself when N = 1 without
    insertions) and ``inserted_m`` to ``layers/inserted_{m % M}`` at index ``m // M``;
    arrays are stacked on axis 0 (G = L / N entries). Other entries pass through."""
    if num_layers % group:
        raise ConversionError(f"cannot scan {num_layers} layers in groups of {group}.")
    g_count = num_layers // group
    plain = group == 1 and inserts_per_group == 0
    out: dict = {}
    pieces: dict[Path, list] = {}
    k = len(container)
    for path, v in flat.items():
        coll, rest = path[0], path[1:]
        m = re.fullmatch(r"(layers|inserted)_(\d+)", rest[k]) if rest[:k] == container and len(rest) > k else None
        if m is None:
            out[path] = v
            continue
        idx = int(m.group(2))
        if m.group(1) == "layers":
            g, sub = divmod(idx, group)
            inner = () if plain else (f"block_{sub}",)
        else:
            if not inserts_per_group:
                raise ConversionError(f"{'/'.join(path)}: inserted blocks but the scanned module has none.")
            g, sub = divmod(idx, inserts_per_group)
            inner = (f"inserted_{sub}",)
        key = (coll,) + container + ("layers",) + inner + rest[k + 1:]
        slots = pieces.setdefault(key, [None] * g_count)
        if g >= g_count:
            raise ConversionError(f"{'/'.join(path)} is beyond the {g_count} scanned groups.")
        slots[g] = v
    for key, vs in pieces.items():
        if any(v is None for v in vs):
            raise ConversionError(f"cannot stack {'/'.join(key)}: some of the {g_count} groups are missing.")
        out[key] = np.stack([np.asarray(v) for v in vs], axis=0)
    return out


def stack_params(params: dict, num_layers: int, *, container: Path = (), group: int = 1,
                 inserts_per_group: int = 0) -> dict:
    """`stack_layers` on a nested params dict (no collection level): the unrolled parameters of
    a stack -> the ``scan_layers=True`` layout."""
    flat = {("params",) + p: v for p, v in traverse_util.flatten_dict(params).items()}
    flat = stack_layers(flat, tuple(container), num_layers, group, inserts_per_group)
    return traverse_util.unflatten_dict({p[1:]: v for p, v in flat.items()})


def convert(conversion: Conversion, tensors: dict[str, np.ndarray], *, abstract=None,
            param_dtype: Any = jnp.float32) -> dict:
    """Apply the rules strictly; -> nested dict of numpy variables ``{'params': ..., ...}``.

    Floating tensors are cast to ``param_dtype``. ``abstract`` (from `abstract_variables`)
    is computed if not given.
    """
    abstract = abstract_variables(conversion) if abstract is None else abstract
    expected = {p: v for p, v in traverse_util.flatten_dict(nn.unbox(abstract)).items()}
    consumed: set[str] = set()
    flat: dict[Path, np.ndarray] = {}
    for r in conversion.rules:
        missing = [k for k in r.hf_keys if k not in tensors]
        if missing:
            raise ConversionError(f"missing key {missing[0]!r} in the checkpoint (needed for "
                                  f"{'/'.join(r.path)}); is this the right architecture/config?")
        if r.path in flat:
            raise ConversionError(f"two rules fill {'/'.join(r.path)} (converter bug).")
        try:
            flat[r.path] = np.asarray(r.transform(*[tensors[k] for k in r.hf_keys]))
        except ValueError as e:
            raise ConversionError(f"shape mismatch converting {r.hf_keys[0]!r} "
                                  f"{tuple(tensors[r.hf_keys[0]].shape)} for {'/'.join(r.path)}: {e}") from None
        consumed.update(r.hf_keys)
    unexpected = sorted(k for k in tensors if k not in consumed
                        and not any(re.fullmatch(p, k) for p in conversion.ignore))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"unexpected key {unexpected[0]!r}{more} in the checkpoint: no Flax variable "
                              "takes it. Check the architecture/config (e.g. a head the module lacks).")
    origin = {r.path: r.hf_keys[0] for r in conversion.rules}
    for container, n in conversion.stack:
        layout = scanned_layout([p for p in expected if p[0] == "params"], tuple(container))
        if layout is not None:
            before = dict(flat)
            flat = stack_layers(flat, tuple(container), n, *layout)
            for p in flat:
                if p not in before:
                    k = 1 + len(container)
                    inner = p[k + 2:] if layout != (1, 0) else p[k + 1:]
                    src = p[:k] + ("layers_0",) + inner
                    origin[p] = origin.get(src, "?") + " (stacked over layers)"
    for path, arr in flat.items():
        if path not in expected:
            raise ConversionError(f"converted {origin.get(path, '?')!r} to {'/'.join(path)}, which the module "
                                  "does not have (converter/config mismatch).")
        want = expected[path]
        if tuple(arr.shape) != tuple(want.shape):
            raise ConversionError(f"shape mismatch for key {origin.get(path, '?')!r}: checkpoint gives "
                                  f"{tuple(arr.shape)} for {'/'.join(path)}, the module expects {tuple(want.shape)}.")
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16:
            flat[path] = arr.astype(want.dtype if path[0] != "params" else param_dtype)
    unfilled = sorted(set(expected) - set(flat))
    if unfilled:
        raise ConversionError(f"module variable {'/'.join(unfilled[0])} is not filled by the checkpoint "
                              f"({len(unfilled)} unfilled); the converter lacks a rule for it.")
    return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------- placement
# The default logical-axis rules (docs/interfaces.md); mesh axes missing from a mesh are dropped.
def shardings_for(abstract, mesh: jax.sharding.Mesh, rules=None):
    """NamedSharding tree (unboxed structure) for the boxed abstract variables, by the project's
    logical-axis rules (`vlm_jax.sharding.LOGICAL_RULES` unless `rules` is given)."""
    from vlm_jax import sharding

    return sharding.shardings_for(nn.unbox(abstract), nn.get_partition_spec(abstract), mesh,
                                  sharding.LOGICAL_RULES if rules is None else rules)


def place(variables: dict, abstract, mesh: jax.sharding.Mesh | None = None, rules=None) -> dict:
    """numpy variables -> jax arrays; with a mesh, each already sharded by its logical axes
    (rules default to `vlm_jax.sharding.LOGICAL_RULES`)."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, variables)
    shardings = shardings_for(abstract, mesh, rules)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), variables, shardings)


def load(conversion: Conversion, tensors: dict[str, np.ndarray], mesh=None, rules=None,
         param_dtype: Any = jnp.float32) -> dict:
    """`convert` + `place`: -> variables (jax arrays, sharded onto ``mesh`` if given)."""
    abstract = abstract_variables(conversion)
    variables = convert(conversion, tensors, abstract=abstract, param_dtype=param_dtype)
    return place(variables, abstract, mesh, rules)
