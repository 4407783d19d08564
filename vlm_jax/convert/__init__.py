"""Import Hugging Face checkpoints (config.json + safetensors) as Flax modules + variables.

    module, variables, hf_config = load_hf("/path/to/hf_dir", mesh=None)
    out = module.apply(variables, inputs)

The architecture is chosen by ``config.json["architectures"][0]`` through `CONVERTERS`
(architecture name -> converter). Registration points: `vlm_jax.convert.vision.CONVERTERS`
(vision towers, here), `vlm_jax.convert.text.CONVERTERS` (text towers, owned by the text
converter), `vlm_jax.convert.blip2.CONVERTERS` (BLIP-2 composites) and `vlm_jax.convert.idefics.CONVERTERS`
(IDEFICS -> Flamingo); the dicts are merged below,
so adding an entry to any of them registers it.
``text`` is imported if present, so this package works before/without it.

A converter is ``fn(hf_config: dict, keys: set[str], *, dtype, param_dtype, **overrides)
-> vlm_jax.convert.common.Conversion``; see `vlm_jax.convert.common` for the strict checks.
"""
from __future__ import annotations

import importlib
from typing import Any

import jax.numpy as jnp

from vlm_jax.convert import common, vision
from vlm_jax.convert.common import Conversion, ConversionError

CONVERTERS: dict[str, Any] = {}
CONVERTERS.update(vision.CONVERTERS)
try:
    _text = importlib.import_module("vlm_jax.convert.text")
except ModuleNotFoundError as e:   # text converters not written yet
    if e.name != "vlm_jax.convert.text":
        raise
    _text = None
if _text is not None and hasattr(_text, "CONVERTERS"):
    CONVERTERS.update(_text.CONVERTERS)
CONVERTERS.update(importlib.import_module("vlm_jax.convert.blip2").CONVERTERS)   # BLIP-2 composites
CONVERTERS.update(importlib.import_module("vlm_jax.convert.idefics").CONVERTERS)   # IDEFICS (Flamingo)


def architecture_of(hf_config: dict, path: str = "") -> str:
    archs = hf_config.get("architectures") or []
    if not archs:
        raise ConversionError(f"{path}/config.json has no 'architectures' entry; cannot tell which converter "
                              f"to use (known: {sorted(CONVERTERS)}).")
    return archs[0]


def conversion_for(hf_config: dict, keys, *, architecture: str | None = None, dtype: Any = jnp.float32,
                   param_dtype: Any = jnp.float32, **overrides) -> Conversion:
    """The `Conversion` for an HF config dict and the checkpoint's tensor names."""
    arch = architecture or architecture_of(hf_config)
    if arch not in CONVERTERS:
        raise ConversionError(f"unknown architecture {arch!r}: no converter registered. Known architectures: "
                              f"{sorted(CONVERTERS)}.")
    return CONVERTERS[arch](hf_config, set(keys), dtype=dtype, param_dtype=param_dtype, **overrides)


def load_hf(path: str, mesh=None, *, rules=None, architecture: str | None = None, dtype: Any = jnp.float32,
            param_dtype: Any = jnp.float32, **overrides):
    """Load an HF checkpoint directory.

    Args:
      path: directory with config.json and model.safetensors (or a sharded index).
      mesh: optional `jax.sharding.Mesh`; variables come back already sharded by their
        logical axis names and ``rules`` (default `vlm_jax.sharding.LOGICAL_RULES`).
      architecture: override ``architectures[0]`` of config.json.
      dtype / param_dtype: compute / parameter dtype of the built module.
      overrides: converter-specific module options (e.g. ``scan_layers=True``, ``grid=7``).
    Returns:
      (module, variables, hf_config): ``variables`` is the dict to pass to
      ``module.apply`` — ``{'params': ...}`` plus ``'batch_stats'`` for ResNet; plain
      (unboxed) jax arrays.
    """
    hf_config, tensors = common.read_hf_dir(path)
    if architecture is None:
        architecture = architecture_of(hf_config, path)
    conversion = conversion_for(hf_config, tensors.keys(), architecture=architecture, dtype=dtype,
                                param_dtype=param_dtype, **overrides)
    variables = common.load(conversion, tensors, mesh=mesh, rules=rules, param_dtype=param_dtype)
    return conversion.module, variables, hf_config


__all__ = ["CONVERTERS", "Conversion", "ConversionError", "conversion_for", "load_hf"]
