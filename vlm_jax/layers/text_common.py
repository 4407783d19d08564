"""Pieces shared by the text towers (`decoder_lm`, `bert`, `t5`): embedding tables, token
checks, position ids of padded batches, and the towers' output tuple.

Dimension letters: B batch, T text length, D width, V vocabulary, L layers.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.mlp import DEFAULT_KERNEL_INIT


def embed_table(num: int, features: int, axes: tuple[str, str], *, dtype, param_dtype, name: str,
                init=DEFAULT_KERNEL_INIT) -> nn.Embed:
    """Embedding table ``[num, features]`` with logical axes ``axes``."""
    return nn.Embed(num_embeddings=num, features=features, dtype=dtype, param_dtype=param_dtype,
                    embedding_init=nn.with_logical_partitioning(init, axes), name=name)


def check_tokens(tokens, name: str):
    """Raise unless ``tokens`` is an integer ``[B, T]`` array."""
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be int [B, T]; got shape {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array [B, T]; got dtype {tokens.dtype}.")


def check_config_positive(cfg, fields: Sequence[str]):
    """Raise naming ``Config.field`` for every listed field that is not > 0."""
    for f in fields:
        if getattr(cfg, f) <= 0:
            raise ValueError(f"{type(cfg).__name__}.{f} must be positive; got {getattr(cfg, f)}.")


def positions_from_mask(attention_mask) -> jax.Array:
    """Position ids ``[B, T]`` of a (left-)padded batch: ``cumsum(mask) - 1``, pads at 0.

    attention_mask [[0, 0, 1, 1, 1]] -> [[0, 0, 0, 1, 2]]
    """
    m = jnp.asarray(attention_mask).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0) * m


class TextOutput(NamedTuple):
    """Output of the text towers.

    logits: f32 ``[B, T, V]`` (None for `BertEncoder`).
    hidden: ``[B, T, D]`` final hidden states (after the final norm; for OPT with
      ``project_out`` the projected ``[B, T, E]``, i.e. what the LM head reads).
    hidden_states: None, or (with ``output_hidden_states=True``) a tuple of L+1 arrays
      ``[B, T, D]``: the block input (embeddings), then the output of each block, before any
      final norm.
    pooled: ``[B, D]`` BERT pooler output (None elsewhere).
    """
    logits: jax.Array | None
    hidden: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    pooled: jax.Array | None = None
