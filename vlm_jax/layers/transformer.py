"""Transformer blocks and stacks shared by every tower (ViT, CLIP, EVA, GPT-2, OPT, BERT, T5).

Dimension letters: B batch, T length, S encoder/media length, D width, Dc encoder width,
H heads, K head dim, F FFN width, L layers.

`BlockConfig` describes one block; `TransformerBlock(config)` is the block:

  pre-norm  (GPT-2, OPT, ViT, CLIP, EVA, T5)      post-norm (BERT)
    x = x + Drop(SelfAttn(N1(x)))                   x = N1(x + Drop(SelfAttn(x)))
    x = x + Drop(CrossAttn(N2(x), enc))  [opt]      x = N2(x + Drop(CrossAttn(x, enc)))  [opt]
    x = x + Drop(MLP(N3(x)))                        x = N3(x + Drop(MLP(x)))

Submodule / parameter names: ``attn_norm``, ``attn`` (MultiHeadAttention: query, key,
value, out), ``cross_norm``, ``cross_attn`` (only with ``cross_attention=True``),
``mlp_norm``, ``mlp`` (MLP: wi | wi_0, wi_1, wo). In post-norm blocks the same names
denote the norm applied after each residual add.

`TransformerStack(block, num_layers)` applies L identical blocks: unrolled (params
``layers_0 … layers_{L-1}``) or, with ``scan_layers=True``, as one `nn.scan` (params
``layers`` with a leading stacked axis of size L, logical name 'layers'; KV-cache leaves
are stacked on axis 1 so every cache leaf keeps its leading batch dim). ``remat=True``
rematerialises each block in the backward pass (`nn.remat`). Activations are constrained to
('batch', 'length', 'embed') at every block boundary.

Decoding (``decode=True``): self-attention uses the KV cache (`vlm_jax.layers.attention`).
Cross-attention blocks store the keys/values of ``encoded`` in the cross-attention cache
when ``encoded`` is passed, and reuse them when ``encoded`` is None, so a decoding loop
fills the cache once (e.g. with `vlm_jax.layers.attention.init_cache` given ``encoded``)
and then steps without the encoder output and without re-projecting it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers.attention import IMPLEMENTATIONS, MultiHeadAttention
from vlm_jax.layers.mlp import ACTIVATIONS, MLP
from vlm_jax.layers.norms import NORM_TYPES, make_norm

ACT_AXES = ("batch", "length", "embed")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """One transformer block.

    num_heads, head_dim: H, K (attention width H*K may differ from D, as in T5).
    mlp_dim: F. activation: see `vlm_jax.layers.mlp.ACTIVATIONS`.
    norm_position: 'pre' | 'post'. norm_type: 'layernorm' | 'rmsnorm'. norm_eps.
    attn_bias / attn_out_bias / mlp_bias: biases of q,k,v / attention output / MLP dense layers.
    attention_scale: None -> 1/sqrt(K); T5 uses 1.0.
    cross_attention: add a cross-attention sub-block (keys/values from ``encoded``).
    dropout_rate: residual-branch dropout. attention_dropout_rate: on attention probs.
    mlp_dropout_rate: on the MLP hidden activation.
    implementation: attention kernel, None | 'xla' | 'cudnn'.
    causal: self-attention is causal (decoder LMs), applied by the kernel (``is_causal``)
      on top of any ``mask`` passed; no causal mask array needed.
    """
    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "gelu"
    norm_position: str = "pre"
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    attn_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    attention_scale: float | None = None
    cross_attention: bool = False
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    mlp_dropout_rate: float = 0.0
    implementation: str | None = None
    causal: bool = False

    def __post_init__(self):
        if self.norm_position not in ("pre", "post"):
            raise ValueError(f"BlockConfig.norm_position={self.norm_position!r}; use 'pre' or 'post'.")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"BlockConfig.norm_type={self.norm_type!r}; use one of {NORM_TYPES}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"BlockConfig.activation={self.activation!r}; use one of {ACTIVATIONS}.")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"BlockConfig.implementation={self.implementation!r}; use one of {IMPLEMENTATIONS}.")
        for f in ("num_heads", "head_dim", "mlp_dim"):
            if getattr(self, f) <= 0:
                raise ValueError(f"BlockConfig.{f} must be positive; got {getattr(self, f)}.")


class TransformerBlock(nn.Module):
    """One block: ``x [B, T, D]`` (+ ``encoded [B, S, Dc]``) -> ``[B, T, D]``."""
    config: BlockConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda: MultiHeadAttention(  # noqa: E731
            num_heads=c.num_heads, head_dim=c.head_dim, use_bias=c.attn_bias, out_bias=c.attn_out_bias,
            scale=c.attention_scale, dropout_rate=c.attention_dropout_rate,
            implementation=c.implementation, **kw)
        self.attn_norm = make_norm(c.norm_type, c.norm_eps, **kw)
        self.attn = attn()
        if c.cross_attention:
            self.cross_norm = make_norm(c.norm_type, c.norm_eps, **kw)
            self.cross_attn = attn()
        self.mlp_norm = make_norm(c.norm_type, c.norm_eps, **kw)
        self.mlp = MLP(hidden_dim=c.mlp_dim, activation=c.activation, use_bias=c.mlp_bias,
                       dropout_rate=c.mlp_dropout_rate, **kw)
        self.drop = nn.Dropout(c.dropout_rate)

    def __call__(self, x, mask=None, *, encoded=None, cross_mask=None, attn_bias=None, cross_bias=None,
                 deterministic: bool = True, decode: bool = False):
        """Args:
          x: ``[B, T, D]``; mask: bool ``[B|1, 1|H, T, T(or cache S)]``; attn_bias: ``[B|1, H, T, S]``.
          encoded: ``[B, S, Dc]`` for cross-attention (required iff ``config.cross_attention``,
            except while decoding: with ``decode=True`` a given ``encoded`` is projected and
            stored in the cross-attention cache, and None reuses the stored keys/values);
          cross_mask: bool ``[B|1, 1|H, T, S]``; cross_bias: ``[B|1, H, T, S]``.
          deterministic: False enables dropout ('dropout' rng). decode: use the KV cache.
        Returns ``[B, T, D]``.
        """
        return self._forward(x, mask, encoded, cross_mask, attn_bias, cross_bias, deterministic, decode)

    def _forward(self, x, mask, encoded, cross_mask, attn_bias, cross_bias, deterministic, decode):
        c = self.config
        if c.cross_attention and encoded is None and not decode:
            raise ValueError("This block has cross_attention=True: pass encoded=[B, S, Dc] (only decode=True may "
                             "omit it, to reuse the cross-attention KV cache).")
        if not c.cross_attention and encoded is not None:
            raise ValueError("encoded was given but BlockConfig.cross_attention is False.")
        x = nn.with_logical_constraint(x.astype(self.dtype), ACT_AXES)   # residual stream in compute dtype
        pre = c.norm_position == "pre"

        def sub(x, norm, fn):
            if pre:
                return x + self.drop(fn(norm(x)), deterministic=deterministic)
            return norm(x + self.drop(fn(x), deterministic=deterministic))

        x = sub(x, self.attn_norm, lambda h: self.attn(h, mask=mask, bias=attn_bias, deterministic=deterministic,
                                                       decode=decode, is_causal=c.causal))
        if c.cross_attention:
            x = sub(x, self.cross_norm, lambda h: self.cross_attn(h, encoded, mask=cross_mask, bias=cross_bias,
                                                                  deterministic=deterministic, decode=decode,
                                                                  kv_from_cache=decode and encoded is None))
        x = sub(x, self.mlp_norm, lambda h: self.mlp(h, deterministic=deterministic))
        return nn.with_logical_constraint(x, ACT_AXES)


class _StaticBlock(TransformerBlock):
    """The block with its Python flags as attributes, so that `nn.remat` only sees arrays."""
    deterministic: bool = True
    decode: bool = False

    def __call__(self, x, mask, encoded, cross_mask, attn_bias, cross_bias):
        return self._forward(x, mask, encoded, cross_mask, attn_bias, cross_bias,
                             self.deterministic, self.decode)


class _ScanBlock(TransformerBlock):
    """Scan body: carry = (x, selected, layer index); ys = x after this layer (or None)."""
    deterministic: bool = True
    decode: bool = False
    target: int = -1          # index into hidden_states (1..L) whose value is kept in `selected`
    collect: bool = False

    def __call__(self, carry, mask, encoded, cross_mask, attn_bias, cross_bias):
        x, selected, i = carry
        x = self._forward(x, mask, encoded, cross_mask, attn_bias, cross_bias, self.deterministic, self.decode)
        i = i + 1
        selected = jnp.where(i == self.target, x, selected)
        return (x, selected, i), (x if self.collect else None)


class TransformerStack(nn.Module):
    """L identical blocks: ``x [B, T, D]`` (+ ``encoded [B, S, Dc]``) -> ``(out [B, T, D], hidden_states)``.

    With ``decode=True`` and cross-attention blocks, ``encoded=None`` reuses the cross-attention
    KV cache (see `TransformerBlock`).

    ``hidden_states`` (only with ``output_hidden_states=True``, else None) is a tuple of
    L+1 arrays ``[B, T, D]``: the input, then the output of each layer (HF convention).
    ``out`` is ``hidden_states[output_layer]`` (default -1: the last layer). Unrolled, layers
    after ``output_layer`` are not computed at apply time; under scan all L layers run.
    """
    block: BlockConfig
    num_layers: int
    scan_layers: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, *, encoded=None, cross_mask=None, attn_bias=None, cross_bias=None,
                 deterministic: bool = True, decode: bool = False, output_layer: int = -1,
                 output_hidden_states: bool = False):
        n = self.num_layers
        if not -(n + 1) <= output_layer <= n:
            raise ValueError(f"output_layer={output_layer} is out of range for {n} layers "
                             f"(hidden states are indexed 0..{n}, or -{n + 1}..-1).")
        target = output_layer % (n + 1)
        x = nn.with_logical_constraint(x.astype(self.dtype), ACT_AXES)
        args = (mask, encoded, cross_mask, attn_bias, cross_bias)
        kw = dict(config=self.block, dtype=self.dtype, param_dtype=self.param_dtype,
                  deterministic=deterministic, decode=decode)
        if not self.scan_layers:
            cls = nn.remat(_StaticBlock) if self.remat else _StaticBlock
            hidden = [x]
            h = x
            for i in range(n):
                if i >= target and not output_hidden_states and not self.is_initializing():
                    break
                h = cls(name=f"layers_{i}", **kw)(h, *args)
                hidden.append(h)
            out = hidden[target]
            return out, (tuple(hidden) if output_hidden_states else None)

        body = nn.remat(_ScanBlock) if self.remat else _ScanBlock
        scanned = nn.scan(body, variable_axes={"params": 0, "cache": 1},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast,) * 5, length=n,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        carry0 = (x, x, jnp.zeros((), jnp.int32))
        (h, selected, _), ys = scanned(name="layers", target=target, collect=output_hidden_states,
                                       **kw)(carry0, *args)
        out = selected if target != 0 else x
        hidden = None
        if output_hidden_states:
            hidden = (x,) + tuple(ys[i] for i in range(n))
        return out, hidden
