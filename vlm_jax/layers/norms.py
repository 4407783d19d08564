"""Normalisation layers with logical axis names.

Dimension letters: B batch, T length, D width.

`LayerNorm` (mean/variance, scale + optional bias; BERT/GPT/ViT/CLIP) and `RMSNorm`
(T5's "LayerNorm": no mean subtraction, no bias). Statistics are always reduced in
float32 whatever the compute `dtype`; parameters are `param_dtype` with logical axis
``('norm',)``. Parameter names: ``scale`` and ``bias`` (Flax defaults).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

NORM_AXES = ("norm",)


def LayerNorm(epsilon: float = 1e-5, *, use_bias: bool = True, dtype: Any = jnp.float32,
              param_dtype: Any = jnp.float32, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last axis of ``[..., D]`` with ``scale``/``bias`` named ``('norm',)``."""
    return nn.LayerNorm(epsilon=epsilon, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, NORM_AXES),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, NORM_AXES),
                        name=name)


def RMSNorm(epsilon: float = 1e-6, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
            name: str | None = None) -> nn.RMSNorm:
    """RMSNorm (T5 LayerNorm) over the last axis of ``[..., D]``; one ``scale`` param."""
    return nn.RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, NORM_AXES),
                      name=name)


NORM_TYPES = ("layernorm", "rmsnorm")


def make_norm(kind: str, epsilon: float, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              name: str | None = None) -> nn.Module:
    """``kind`` in NORM_TYPES -> the norm module."""
    if kind == "layernorm":
        return LayerNorm(epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "rmsnorm":
        return RMSNorm(epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"norm_type={kind!r} is not known; use one of {NORM_TYPES}.")
