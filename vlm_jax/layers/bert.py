"""BERT-style encoder (BertModel) with optional cross-attention layers, on the shared
`TransformerStack`: the Q-Former's starting point.

Dimension letters: B batch, T text length, S length of the cross-attention input, D width,
Dc width of the cross-attention input, H heads, K head dim, F FFN width, V vocabulary,
P position-table rows, L layers.

`BertEncoder` (`BertConfig`): word + position + token-type embeddings, LayerNorm, post-LN
blocks with exact GELU, optional tanh pooler on [CLS]; optional cross-attention
(``cross_attention_every`` / ``cross_attention_layers``) to an encoded input ``[B, S, Dc]``,
expressed as a repeating block pattern so it can scan.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.layers import masks as masks_lib
from vlm_jax.layers.mlp import Dense
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.text_common import TextOutput, check_config_positive, check_tokens, embed_table
from vlm_jax.layers.transformer import (BlockConfig, TransformerBlock, TransformerStack, check_remat_policy,
                                        periodic_pattern)

__all__ = ["BertConfig", "BertEncoder", "TextOutput"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT-style encoder (BertModel) with optional cross-attention layers.

    vocab_size: V. width: D. num_layers: L. num_heads: H. mlp_dim: F. max_positions: P.
    type_vocab_size: token-type (segment) rows. activation: 'gelu' (exact; BERT).
    norm_eps: LayerNorm epsilon (1e-12). pooler: add the tanh pooler on token 0.
    cross_attention_layers: indices of layers with a cross-attention sub-block
      (keys/values from ``encoded [B, S, Dc]``); ``cross_attention_every=n`` is shorthand for
      layers 0, n, 2n, ... (BLIP-2's Q-Former: every 2nd layer). Both empty for BertModel.
      The layers run as the repeating pattern `layer_pattern` (``cross_attention_every=2``:
      ``(cross, plain)``); a non-periodic ``cross_attention_layers`` set is unrolled-only.
    scan_layers: one `nn.scan` over groups of the pattern (params ``layers/...``, or
      ``layers/block_j/...`` for a pattern of length > 1, stacked on a leading 'layers' axis).
    remat_policy: one of `vlm_jax.layers.transformer.REMAT_POLICIES`.
    """
    vocab_size: int
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_positions: int = 512
    type_vocab_size: int = 2
    activation: str = "gelu"
    norm_eps: float = 1e-12
    pooler: bool = True
    cross_attention_layers: tuple[int, ...] = ()
    cross_attention_every: int = 0
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    implementation: str | None = None
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        check_config_positive(self, ("vocab_size", "width", "num_layers", "num_heads", "mlp_dim",
                                      "max_positions", "type_vocab_size"))
        if self.width % self.num_heads:
            raise ValueError(f"BertConfig.width={self.width} must be divisible by num_heads={self.num_heads}.")
        if self.cross_attention_every < 0:
            raise ValueError(f"BertConfig.cross_attention_every must be >= 0; got {self.cross_attention_every}.")
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"BertConfig.cross_attention_layers {bad} out of range for {self.num_layers} layers.")
        self.block_config(0)
        check_remat_policy(self.remat_policy, field="BertConfig.remat_policy")
        if self.scan_layers:
            n, size = self.num_layers, len(self.layer_pattern())
            if size == n and n > 1:
                raise ValueError(
                    f"BertConfig.scan_layers=True needs a periodic layer layout, but cross-attention in layers "
                    f"{[i for i in range(n) if self.has_cross_attention(i)]} of {n} does not repeat with a period "
                    "shorter than the stack (cross_attention_layers / cross_attention_every). Use "
                    "cross_attention_every=k with num_layers a multiple of k, or scan_layers=False.")

    def has_cross_attention(self, i: int) -> bool:
        every = self.cross_attention_every
        return i in self.cross_attention_layers or (every > 0 and i % every == 0)

    def layer_pattern(self) -> tuple[BlockConfig, ...]:
        """The shortest repeating pattern of block configs (layer i uses ``pattern[i % P]``)."""
        return periodic_pattern([self.block_config(i) for i in range(self.num_layers)])

    @property
    def any_cross_attention(self) -> bool:
        return any(self.has_cross_attention(i) for i in range(self.num_layers))

    def block_config(self, i: int) -> BlockConfig:
        return BlockConfig(
            num_heads=self.num_heads, head_dim=self.width // self.num_heads, mlp_dim=self.mlp_dim,
            activation=self.activation, norm_position="post", norm_type="layernorm", norm_eps=self.norm_eps,
            cross_attention=self.has_cross_attention(i), dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate, implementation=self.implementation)

    @classmethod
    def base(cls, **kw) -> "BertConfig":
        """bert-base-uncased: 12 x 768, 12 heads, FFN 3072, vocab 30522, 512 positions."""
        return cls(**{**dict(vocab_size=30522, width=768, num_layers=12, num_heads=12, mlp_dim=3072), **kw})


class BertEncoder(nn.Module):
    """BERT encoder: ``tokens [B, T]`` (+ ``encoded [B, S, Dc]``) -> `TextOutput` (hidden, pooled).

    Parameters: ``word_embed [V, D]``, ``position_embed [P, D]``, ``type_embed [types, D]``,
    ``embed_norm``, ``layers_i/...`` (post-LN `TransformerBlock`; ``cross_attn``/``cross_norm``
    in cross-attention layers; scanned: ``layers/...``), ``pooler/kernel [D, D]``, ``pooler/bias``.

    ``block_cls``: the block module of every layer (a `TransformerBlock` subclass, e.g. a
    Q-Former block overriding ``mlp_sublayer``).
    """
    config: BertConfig
    block_cls: type = TransformerBlock
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embed = embed_table(c.vocab_size, c.width, ("vocab", "embed"), name="word_embed", **kw)
        self.position_embed = embed_table(c.max_positions, c.width, ("positions", "embed"), name="position_embed", **kw)
        self.type_embed = embed_table(c.type_vocab_size, c.width, ("positions", "embed"), name="type_embed", **kw)
        self.embed_norm = LayerNorm(c.norm_eps, name="embed_norm", **kw)
        if c.pooler:
            self.pooler = Dense(c.width, ("embed", "hidden"), name="pooler", **kw)
        self.drop = nn.Dropout(c.dropout_rate)
        self.stack = TransformerStack(c.layer_pattern(), c.num_layers, scan_layers=c.scan_layers,
                                      remat_policy=c.remat_policy, block_cls=self.block_cls, **kw)
        nn.share_scope(self, self.stack)           # layers_i live next to the embeddings

    def embed(self, tokens=None, *, token_type_ids=None, position_ids=None, inputs_embeds=None,
              deterministic: bool = True):
        """Word (or ``inputs_embeds``) + position + token-type embeddings, normed: ``[B, T, D]``."""
        c = self.config
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("BertEncoder: pass exactly one of tokens [B, T] or inputs_embeds [B, T, D].")
        if tokens is not None:
            check_tokens(tokens, "tokens")
            x = self.word_embed(tokens)
        else:
            x = inputs_embeds.astype(self.dtype)
        b, t = x.shape[0], x.shape[1]
        if t > c.max_positions:
            raise ValueError(f"sequence length {t} exceeds BertConfig.max_positions={c.max_positions}.")
        if position_ids is None:
            position_ids = jnp.arange(t, dtype=jnp.int32)[None]
        if token_type_ids is None:
            token_type_ids = jnp.zeros((1, t), jnp.int32)
        x = x + self.type_embed(token_type_ids) + self.position_embed(position_ids)
        return self.drop(self.embed_norm(x), deterministic=deterministic)

    def encode(self, x, *, attention_mask=None, encoded=None, encoder_mask=None,
               output_hidden_states: bool = False, deterministic: bool = True):
        """Run the blocks on embedded ``x [B, T, D]`` -> (``[B, T, D]``, hidden states or None).

        attention_mask: ``[B, T]`` (1 = real) or a rank-4 bool mask ``[B|1, 1, T, T]`` (e.g.
        from `vlm_jax.layers.masks` for the Q-Former's ITC/ITG masks). encoded ``[B, S, Dc]``
        and encoder_mask ``[B, S]`` feed the cross-attention layers.
        """
        c = self.config
        if attention_mask is not None and jnp.ndim(attention_mask) == 2:
            mask = masks_lib.padding_mask(attention_mask)
        else:
            mask = attention_mask
        cross_mask = None if encoder_mask is None else masks_lib.padding_mask(encoder_mask)
        any_cross = c.any_cross_attention
        if any_cross and encoded is None:
            raise ValueError("BertConfig has cross-attention layers: pass encoded=[B, S, Dc].")
        if not any_cross and encoded is not None:
            raise ValueError("encoded was given but BertConfig has no cross-attention layers "
                             "(set cross_attention_layers or cross_attention_every).")
        return self.stack(x, mask, encoded=encoded, cross_mask=cross_mask, deterministic=deterministic,
                          output_hidden_states=output_hidden_states)

    def __call__(self, tokens=None, *, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, encoded=None, encoder_mask=None, output_hidden_states: bool = False,
                 deterministic: bool = True) -> TextOutput:
        """``tokens [B, T]`` -> `TextOutput(logits=None, hidden [B, T, D], hidden_states, pooled [B, D])`."""
        x = self.embed(tokens, token_type_ids=token_type_ids, position_ids=position_ids,
                       inputs_embeds=inputs_embeds, deterministic=deterministic)
        x, hidden = self.encode(x, attention_mask=attention_mask, encoded=encoded, encoder_mask=encoder_mask,
                                output_hidden_states=output_hidden_states, deterministic=deterministic)
        pooled = jnp.tanh(self.pooler(x[:, 0])) if self.config.pooler else None
        return TextOutput(logits=None, hidden=x, hidden_states=hidden, pooled=pooled)
