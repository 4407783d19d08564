"""Decoder-only language model (GPT-2, OPT, LLaMA) on the shared `TransformerStack`.

Dimension letters: B batch (N = batch*beam while decoding), T text length, S key length
(the KV-cache length while decoding), D width, E word-embedding width (OPT's
``word_embed_proj_dim``; = D elsewhere), Dm media width (inserted blocks), H heads, Hkv
key/value heads (grouped-query attention), K head dim, F FFN width, V vocabulary, P
position-table rows, L layers.

`DecoderLM` (`DecoderLMConfig`): GPT-2 (learned positions, pre-LN, GELU-tanh, tied head),
OPT (learned positions read at ``position + 2``, pre- or post-LN, ReLU, optional
``project_in``/``project_out`` when E != D, tied head) and the LLaMA family
(``position_embedding='rotary'``: no position table, rotary q/k in every self-attention;
pre-RMSNorm; SwiGLU MLP ``wo(silu(wi_0 x) * wi_1 x)``; no biases; grouped-query attention
with ``num_kv_heads``; untied or tied head; `DecoderLMConfig.llama`). Position ids come from
the attention mask (``cumsum(mask) - 1``, pads at 0), as HF does for left-padded batches
(for rotary models HF's forward uses 0..T-1 without ``position_ids``; rotary attention
depends on position differences only, so both give the same logits at real tokens).
Incremental decoding through the blocks' KV cache (``decode=True``; see
`vlm_jax.generate`); a rotary model decoding without ``position_ids`` rotates the new tokens
at the cache index. Causality goes to the attention kernel (``is_causal``), not a [T, T]
mask array.

Flamingo's insertion point is declarative: ``DecoderLMConfig.insert = InsertSpec(module,
kwargs, every=N, offset=k)`` puts ``module`` before every layer i with ``i % N == k``, in its
own parameter scope (``inserted_m``), called with the ``inserted_inputs`` tuple of
`DecoderLM.__call__` (full forward and decoding alike), scannable as groups of N layers.
Logits are returned in float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.layers import masks as masks_lib
from vlm_jax.layers.mlp import Dense
from vlm_jax.layers.norms import NORM_TYPES, make_norm
from vlm_jax.layers.text_common import (TextOutput, check_config_positive, check_tokens, embed_table,
                                        positions_from_mask)
from vlm_jax.layers.transformer import (BlockConfig, InsertSpec, TransformerStack, check_remat_policy,
                                        group_size)

__all__ = ["DecoderLM", "DecoderLMConfig", "InsertSpec", "TextOutput", "positions_from_mask"]

POSITION_EMBEDDINGS = ("learned", "rotary")


@dataclasses.dataclass(frozen=True)
class DecoderLMConfig:
    """Decoder-only LM (GPT-2 / OPT / LLaMA family).

    vocab_size: V. width: D. num_layers: L. num_heads: H (K = D / H unless ``head_dim``). mlp_dim: F.
    max_positions: P, rows of the learned position table are ``P + position_offset``
      (rotary models: the trained context, not enforced).
    position_offset: OPT reads row ``position + 2`` (2); GPT-2 0.
    activation: 'gelu_tanh' (GPT-2) | 'relu' (OPT) | 'gated_silu' (LLaMA's SwiGLU) | any
      `vlm_jax.layers.mlp.ACTIVATIONS`.
    norm_position: 'pre' (GPT-2, OPT >= 1.3B, LLaMA) | 'post' (OPT-350m).
    norm_eps: epsilon of every norm (LLaMA: HF ``rms_norm_eps``).
    final_norm: a norm after the last block (pre-LN models).
    embed_dim: E, word-embedding width when it differs from D (OPT-350m: E=512, D=1024 ->
      ``project_in [E, D]`` and ``project_out [D, E]``); None = D.
    tie_embeddings: LM head = word embedding transposed; else a separate ``lm_head [E, V]``.
    use_bias: biases on attention and MLP dense layers.
    dropout_rate / attention_dropout_rate: residual/embedding dropout and attention-prob dropout.
    implementation: attention kernel (None | 'xla' | 'cudnn').
    scan_layers: one `nn.scan` over the layers (params ``layers/...`` stacked on a leading
      'layers' axis; with ``insert``: ``layers/block_j``, ``layers/inserted_m``, see
      `vlm_jax.layers.transformer`). remat_policy: one of `REMAT_POLICIES`.
    insert: optional `InsertSpec`: a block inserted before every ``insert.every``-th layer
      (Flamingo's GATED XATTN-DENSE), called with the ``inserted_inputs`` of `DecoderLM.__call__`.
    position_embedding: 'learned' (GPT-2 / OPT: a ``position_embed`` table added to the
      embeddings) | 'rotary' (LLaMA: no table; q/k rotated in every self-attention).
    rope_theta: rotary base (HF ``rope_theta``), used with 'rotary'.
    num_kv_heads: Hkv key/value heads (grouped-query attention; divides H); None = H.
    head_dim: K when it is not D / H (HF LLaMA ``head_dim``); None = D / H.
    norm_type: 'layernorm' (GPT-2 / OPT) | 'rmsnorm' (LLaMA), for the blocks and the final norm.
    """
    vocab_size: int
    width: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    max_positions: int
    position_offset: int = 0
    activation: str = "gelu_tanh"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    final_norm: bool = True
    embed_dim: int | None = None
    tie_embeddings: bool = True
    use_bias: bool = True
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    implementation: str | None = None
    scan_layers: bool = False
    remat_policy: str = "none"
    insert: InsertSpec | None = None
    position_embedding: str = "learned"
    rope_theta: float = 10000.0
    num_kv_heads: int | None = None
    head_dim: int | None = None
    norm_type: str = "layernorm"

    def __post_init__(self):
        check_config_positive(self, ("vocab_size", "width", "num_layers", "num_heads", "mlp_dim",
                                      "max_positions"))
        if self.head_dim is None and self.width % self.num_heads:
            raise ValueError(f"DecoderLMConfig.width={self.width} must be divisible by num_heads={self.num_heads} "
                             "(or set head_dim).")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"DecoderLMConfig.position_embedding={self.position_embedding!r}; use one of "
                             f"{POSITION_EMBEDDINGS}.")
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"DecoderLMConfig.norm_type={self.norm_type!r}; use one of {NORM_TYPES}.")
        if self.head_dim is not None and self.head_dim <= 0:
            raise ValueError(f"DecoderLMConfig.head_dim must be positive or None; got {self.head_dim}.")
        if self.num_kv_heads is not None and (self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"DecoderLMConfig.num_kv_heads={self.num_kv_heads} must be a positive divisor of "
                             f"num_heads={self.num_heads}, or None.")
        if self.rotary and (self.rope_theta <= 0 or self.attn_head_dim % 2):
            raise ValueError(f"DecoderLMConfig.position_embedding='rotary' needs rope_theta > 0 (got "
                             f"{self.rope_theta}) and an even head dim (got {self.attn_head_dim}).")
        self.block_config()          # validates activation / norm_position / implementation
        check_remat_policy(self.remat_policy, field="DecoderLMConfig.remat_policy")
        if self.insert is not None and not isinstance(self.insert, InsertSpec):
            raise ValueError(f"DecoderLMConfig.insert must be an InsertSpec or None; got {self.insert!r}.")
        size = group_size(1, self.insert)
        if self.scan_layers and self.num_layers % size:
            raise ValueError(f"DecoderLMConfig.scan_layers=True needs num_layers={self.num_layers} to be a multiple "
                             f"of insert.every={size}; change insert.every or num_layers, or set scan_layers=False.")

    @property
    def word_dim(self) -> int:
        return self.embed_dim or self.width

    @property
    def rotary(self) -> bool:
        return self.position_embedding == "rotary"

    @property
    def attn_head_dim(self) -> int:
        """K, the attention head dim."""
        return self.head_dim or self.width // self.num_heads

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            num_heads=self.num_heads, head_dim=self.attn_head_dim, mlp_dim=self.mlp_dim,
            activation=self.activation, norm_position=self.norm_position, norm_type=self.norm_type,
            norm_eps=self.norm_eps, attn_bias=self.use_bias, attn_out_bias=self.use_bias,
            mlp_bias=self.use_bias, dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate, implementation=self.implementation, causal=True,
            num_kv_heads=self.num_kv_heads if self.num_kv_heads != self.num_heads else None,
            rope_theta=self.rope_theta if self.rotary else None)

    # Paper-size presets (HF hub configs of the same names).
    @classmethod
    def gpt2(cls, **kw) -> "DecoderLMConfig":
        """GPT-2 small (124M): 12 x 768, 12 heads, 1024 positions, vocab 50257."""
        return cls(**{**dict(vocab_size=50257, width=768, num_layers=12, num_heads=12, mlp_dim=3072,
                             max_positions=1024), **kw})

    @classmethod
    def opt(cls, size: str = "2.7b", **kw) -> "DecoderLMConfig":
        """OPT presets: '125m', '350m', '1.3b', '2.7b', '6.7b' (facebook/opt-*)."""
        shapes = {"125m": (768, 12, 12), "350m": (1024, 24, 16), "1.3b": (2048, 24, 32),
                  "2.7b": (2560, 32, 32), "6.7b": (4096, 32, 32)}
        if size not in shapes:
            raise ValueError(f"DecoderLMConfig.opt(size={size!r}); choose one of {sorted(shapes)}.")
        d, n, h = shapes[size]
        extra = dict(norm_position="post", final_norm=False, embed_dim=512) if size == "350m" else {}
        return cls(**{**dict(vocab_size=50272, width=d, num_layers=n, num_heads=h, mlp_dim=4 * d,
                             max_positions=2048, position_offset=2, activation="relu", **extra), **kw})

    @classmethod
    def llama(cls, size: str = "7b", **kw) -> "DecoderLMConfig":
        """LLaMA-family presets: '7b' (meta-llama/Llama-2-7b-hf: 32 x 4096, 32 heads, F 11008,
        6.74B) and 'tinyllama-1.1b' (TinyLlama/TinyLlama-1.1B: 22 x 2048, 32 heads, 4 kv heads,
        F 5632, 1.10B); vocab 32000, rms_norm_eps 1e-5, untied head."""
        shapes = {"7b": (4096, 32, 32, None, 11008, 4096), "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 2048)}
        if size not in shapes:
            raise ValueError(f"DecoderLMConfig.llama(size={size!r}); choose one of {sorted(shapes)}.")
        d, n, h, hkv, f, p = shapes[size]
        return cls(**{**dict(vocab_size=32000, width=d, num_layers=n, num_heads=h, num_kv_heads=hkv, mlp_dim=f,
                             max_positions=p, **cls.llama_layout()), **kw})

    @staticmethod
    def llama_layout() -> dict:
        """The fields that make a LLaMA-family block: rotary, pre-RMSNorm, SwiGLU, no biases, untied head."""
        return dict(position_embedding="rotary", rope_theta=10000.0, norm_type="rmsnorm", norm_eps=1e-5,
                    activation="gated_silu", use_bias=False, tie_embeddings=False)


class DecoderLM(nn.Module):
    """Decoder-only LM: ``tokens [B, T]`` -> `TextOutput` (logits ``[B, T, V]``).

    Parameters: ``token_embed/embedding [V, E]`` ('vocab', 'embed'),
    ``position_embed/embedding [P + offset, D]`` ('positions', 'embed'; learned positions only),
    ``project_in/kernel [E, D]``, ``project_out/kernel [D, E]`` (only when E != D),
    ``layers_i/...`` (`TransformerBlock`; scanned: ``layers/...``), ``inserted_m/...`` (only
    with ``config.insert``), ``final_norm``, ``lm_head/kernel [E, V]`` (untied only).
    """
    config: DecoderLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embed = embed_table(c.vocab_size, c.word_dim, ("vocab", "embed"), name="token_embed", **kw)
        if not c.rotary:
            self.position_embed = embed_table(c.max_positions + c.position_offset, c.width,
                                              ("positions", "embed"), name="position_embed", **kw)
        if c.word_dim != c.width:
            self.project_in = Dense(c.width, (None, "embed"), use_bias=False, name="project_in", **kw)
            self.project_out = Dense(c.word_dim, ("embed", None), use_bias=False, name="project_out", **kw)
        if c.final_norm:
            self.final_norm = make_norm(c.norm_type, c.norm_eps, name="final_norm", **kw)
        if not c.tie_embeddings:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head", **kw)
        self.drop = nn.Dropout(c.dropout_rate)
        # causal blocks: while decoding from a filled cache the cache mask is causal already
        self.stack = TransformerStack(c.block_config(), c.num_layers, scan_layers=c.scan_layers,
                                      remat_policy=c.remat_policy, insert=c.insert, **kw)
        nn.share_scope(self, self.stack)           # layers_i live next to the embeddings

    def embed_tokens(self, tokens):
        """``tokens [B, T]`` -> word embeddings ``[B, T, E]`` (before positions / project_in).

        Use it to build ``inputs_embeds`` with a soft prefix (BLIP-2) in front of text.
        """
        return self.token_embed(tokens)

    def embed_mixture(self, weights):
        """``weights [B, T, V]`` (distributions over the vocabulary) -> ``[B, T, E]``: each row the
        weighted mean of the word embeddings (a soft token inside the words' convex hull)."""
        table = jnp.asarray(self.token_embed.embedding, self.dtype)
        return jnp.einsum("btv,ve->bte", weights.astype(self.dtype), table)

    def logits_from_hidden(self, hidden):
        """Final hidden states ``[B, T, E]`` (`TextOutput.hidden`) -> f32 logits ``[B, T, V]``."""
        if self.config.tie_embeddings:
            return self.token_embed.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, tokens=None, *, attention_mask=None, position_ids=None, inputs_embeds=None,
                 inserted_inputs: tuple = (), output_hidden_states: bool = False,
                 deterministic: bool = True, decode: bool = False, key_valid=None) -> TextOutput:
        """Forward pass (full sequence, or new tokens against the KV cache).

        Args:
          tokens: int ``[B, T]``; or None with ``inputs_embeds [B, T, E]`` (word embeddings,
            e.g. `embed_tokens` output with a soft prefix; positions are still added).
          attention_mask: ``[B, T]`` 1 = real token, 0 = padding (left padding for prompts).
            Masks padded keys and sets the default position ids. Not used with ``decode``.
          position_ids: int ``[B, T]`` (default: from ``attention_mask``, else ``arange(T)``; rotary
            models decoding without them: the KV-cache index onwards).
          inserted_inputs: tuple of extra inputs of the inserted blocks (``config.insert``),
            e.g. ``(media [B, S, Dm], media_mask [B|1, 1, T, S])``; passed on every call, also
            while decoding.
          output_hidden_states: also return every block's output (`TextOutput`).
          deterministic: False enables dropout (needs a 'dropout' rng).
          decode: run against the KV cache (Flax collection 'cache', created by
            `vlm_jax.layers.attention.init_cache` or `vlm_jax.generate`): the T new tokens are
            written at each row's cache index and attend causally to the cache.
          key_valid: with ``decode``, bool ``[B, S]`` over the whole cache: which slots hold
            real (non-pad) tokens. Default: all.
        Returns:
          `TextOutput` with ``logits`` f32 ``[B, T, V]`` and ``hidden [B, T, E]``.
        """
        c = self.config
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("DecoderLM: pass exactly one of tokens [B, T] or inputs_embeds [B, T, E].")
        if tokens is not None:
            check_tokens(tokens, "tokens")
            x = self.embed_tokens(tokens)
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != c.word_dim:
                raise ValueError(f"inputs_embeds must be [B, T, E={c.word_dim}]; got {inputs_embeds.shape}.")
            x = inputs_embeds.astype(self.dtype)
        b, t = x.shape[0], x.shape[1]
        if decode and key_valid is not None and position_ids is None:
            raise ValueError("DecoderLM(decode=True): pass position_ids [B, T] of the new tokens (they cannot be "
                             "inferred from the cache); vlm_jax.generate does this for you.")
        if position_ids is None and not (decode and c.rotary):
            position_ids = (positions_from_mask(attention_mask) if attention_mask is not None
                            else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        if position_ids is not None and position_ids.shape != (b, t) and position_ids.shape != (1, t):
            raise ValueError(f"position_ids must be [B, T] = [{b}, {t}]; got {position_ids.shape}.")
        if not decode and not c.rotary and t > c.max_positions:
            raise ValueError(f"sequence length {t} exceeds DecoderLMConfig.max_positions={c.max_positions} "
                             "(the learned position table); truncate the input.")
        if c.word_dim != c.width:
            x = self.project_in(x)
        if not c.rotary:
            x = x + self.position_embed(position_ids + c.position_offset)
        x = self.drop(x, deterministic=deterministic)

        if decode:
            # [B, 1, 1, S] (+ the causal cache mask); without key_valid only the cache mask
            mask = None if key_valid is None else masks_lib.padding_mask(key_valid)
        else:
            # Causality goes to the attention kernel (`is_causal`), not a [T, T] mask array: on GPU
            # the cuDNN kernel then skips masked blocks instead of adding a dense bias.
            mask = None
            if attention_mask is not None:
                if attention_mask.shape != (b, t):
                    raise ValueError(f"attention_mask must be [B, T] = [{b}, {t}]; got {attention_mask.shape}.")
                mask = masks_lib.padding_mask(attention_mask)

        rotary = {"positions": position_ids} if c.rotary else {}      # None while decoding: the cache index
        x, hidden = self.stack(x, mask, inserted_inputs=inserted_inputs, deterministic=deterministic,
                               decode=decode, output_hidden_states=output_hidden_states, **rotary)
        if c.final_norm:
            x = self.final_norm(x)
        if c.word_dim != c.width:
            x = self.project_out(x)
        return TextOutput(logits=self.logits_from_hidden(x), hidden=x,
                          hidden_states=hidden)
