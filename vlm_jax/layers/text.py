"""Text towers built on the shared blocks: decoder-only LM (GPT-2, OPT), BERT encoder, T5.

Dimension letters: B batch (N = batch*beam while decoding), T text length, S key length
(the KV-cache length while decoding; the encoder length for cross-attention), D width,
E word-embedding width (OPT's ``word_embed_proj_dim``; = D elsewhere), Dc width of the
cross-attention input, H heads, K head dim, F FFN width, V vocabulary, P position-table
rows, R relative-position buckets, L layers.

Every tower is a stack of `vlm_jax.layers.transformer.TransformerBlock`s, unrolled as
``layers_0 .. layers_{L-1}`` (so per-layer options and hooks are possible), over
`MultiHeadAttention` / `MLP` / norms from the same package. Nothing here re-implements
attention. Parameters carry logical axis names (docs/interfaces.md); ``dtype`` is the
compute dtype, ``param_dtype`` the storage dtype; logits are returned in float32.

Towers
------
`DecoderLM` (`DecoderLMConfig`): GPT-2 (learned positions, pre-LN, GELU-tanh, tied head)
  and OPT (learned positions read at ``position + 2``, pre- or post-LN, ReLU, optional
  ``project_in``/``project_out`` when E != D, tied head). Position ids come from the
  attention mask (``cumsum(mask) - 1``, pads at 0), as HF does for left-padded batches.
  Incremental decoding through the blocks' KV cache (``decode=True``; see `vlm_jax.generate`).
  Hook point for Flamingo: ``layer_callback(i, x) -> x`` runs on the hidden states
  ``[B, T, D]`` right before block ``i`` (in the full forward and while decoding).

`BertEncoder` (`BertConfig`): word + position + token-type embeddings, LayerNorm,
  post-LN blocks with exact GELU, optional tanh pooler on [CLS]; optional cross-attention
  (``cross_attention_layers``) to an encoded input ``[B, S, Dc]`` — the Q-Former's start.

`T5` (`T5Config`): T5 v1.0/v1.1/Flan-T5 encoder-decoder. RMS "T5 LayerNorm", relative
  position buckets (bidirectional in the encoder, causal in the decoder) whose bias table
  lives in the first layer of each stack and is shared by all its layers, no 1/sqrt(K)
  scaling, gated-GELU (v1.1) or ReLU (v1.0) FFN, shared input embedding, untied or tied
  (then rescaled by D**-0.5) LM head; decoder KV cache for generation: self-attention keys/
  values per step, cross-attention keys/values of the encoder output stored once (a
  ``decode=True`` call with ``encoded`` fills them, later ones pass ``encoded=None``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers import masks as masks_lib
from vlm_jax.layers.mlp import DEFAULT_KERNEL_INIT, Dense
from vlm_jax.layers.norms import LayerNorm, RMSNorm
from vlm_jax.layers.transformer import BlockConfig, TransformerBlock

LayerCallback = Callable[[int, jax.Array], jax.Array]


# ------------------------------------------------------------------------------ helpers
def _embed(num: int, features: int, axes: tuple[str, str], *, dtype, param_dtype, name: str,
           init=DEFAULT_KERNEL_INIT) -> nn.Embed:
    """Embedding table ``[num, features]`` with logical axes ``axes``."""
    return nn.Embed(num_embeddings=num, features=features, dtype=dtype, param_dtype=param_dtype,
                    embedding_init=nn.with_logical_partitioning(init, axes), name=name)


class _Block(TransformerBlock):
    """`TransformerBlock` with its Python flags as attributes, so `nn.remat` sees arrays only."""
    deterministic: bool = True
    decode: bool = False

    def __call__(self, x, mask, encoded, cross_mask, attn_bias, cross_bias):
        return self._forward(x, mask, encoded, cross_mask, attn_bias, cross_bias, self.deterministic,
                             self.decode)


def _make_block(config: BlockConfig, *, remat: bool, deterministic: bool, decode: bool, dtype,
                param_dtype, name: str) -> nn.Module:
    cls = nn.remat(_Block) if remat else _Block
    return cls(config=config, deterministic=deterministic, decode=decode, dtype=dtype,
               param_dtype=param_dtype, name=name)


def _check_tokens(tokens, name: str):
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be int [B, T]; got shape {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array [B, T]; got dtype {tokens.dtype}.")


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


def _check_config_positive(cfg, fields: Sequence[str]):
    for f in fields:
        if getattr(cfg, f) <= 0:
            raise ValueError(f"{type(cfg).__name__}.{f} must be positive; got {getattr(cfg, f)}.")


# =========================================================================== decoder LM
@dataclasses.dataclass(frozen=True)
class DecoderLMConfig:
    """Decoder-only LM (GPT-2 / OPT family).

    vocab_size: V. width: D. num_layers: L. num_heads: H (K = D / H). mlp_dim: F.
    max_positions: P, rows of the learned position table are ``P + position_offset``.
    position_offset: OPT reads row ``position + 2`` (2); GPT-2 0.
    activation: 'gelu_tanh' (GPT-2) | 'relu' (OPT) | any `vlm_jax.layers.mlp.ACTIVATIONS`.
    norm_position: 'pre' (GPT-2, OPT >= 1.3B) | 'post' (OPT-350m).
    final_norm: LayerNorm after the last block (pre-LN models).
    embed_dim: E, word-embedding width when it differs from D (OPT-350m: E=512, D=1024 ->
      ``project_in [E, D]`` and ``project_out [D, E]``); None = D.
    tie_embeddings: LM head = word embedding transposed; else a separate ``lm_head [E, V]``.
    use_bias: biases on attention and MLP dense layers.
    dropout_rate / attention_dropout_rate: residual/embedding dropout and attention-prob dropout.
    implementation: attention kernel (None | 'xla' | 'cudnn'). remat: rematerialise blocks.
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
    remat: bool = False

    def __post_init__(self):
        _check_config_positive(self, ("vocab_size", "width", "num_layers", "num_heads", "mlp_dim",
                                      "max_positions"))
        if self.width % self.num_heads:
            raise ValueError(f"DecoderLMConfig.width={self.width} must be divisible by num_heads={self.num_heads}.")
        self.block_config()          # validates activation / norm_position / implementation

    @property
    def word_dim(self) -> int:
        return self.embed_dim or self.width

    def block_config(self) -> BlockConfig:
        return BlockConfig(
            num_heads=self.num_heads, head_dim=self.width // self.num_heads, mlp_dim=self.mlp_dim,
            activation=self.activation, norm_position=self.norm_position, norm_type="layernorm",
            norm_eps=self.norm_eps, attn_bias=self.use_bias, attn_out_bias=self.use_bias,
            mlp_bias=self.use_bias, dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate, implementation=self.implementation)

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


class DecoderLM(nn.Module):
    """Decoder-only LM: ``tokens [B, T]`` -> `TextOutput` (logits ``[B, T, V]``).

    Parameters: ``token_embed/embedding [V, E]`` ('vocab', 'embed'),
    ``position_embed/embedding [P + offset, D]`` ('positions', 'embed'),
    ``project_in/kernel [E, D]``, ``project_out/kernel [D, E]`` (only when E != D),
    ``layers_i/...`` (`TransformerBlock`), ``final_norm``, ``lm_head/kernel [E, V]`` (untied only).
    """
    config: DecoderLMConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embed = _embed(c.vocab_size, c.word_dim, ("vocab", "embed"), name="token_embed", **kw)
        self.position_embed = _embed(c.max_positions + c.position_offset, c.width, ("positions", "embed"),
                                     name="position_embed", **kw)
        if c.word_dim != c.width:
            self.project_in = Dense(c.width, (None, "embed"), use_bias=False, name="project_in", **kw)
            self.project_out = Dense(c.word_dim, ("embed", None), use_bias=False, name="project_out", **kw)
        if c.final_norm:
            self.final_norm = LayerNorm(c.norm_eps, name="final_norm", **kw)
        if not c.tie_embeddings:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head", **kw)
        self.drop = nn.Dropout(c.dropout_rate)

    def embed_tokens(self, tokens):
        """``tokens [B, T]`` -> word embeddings ``[B, T, E]`` (before positions / project_in).

        Use it to build ``inputs_embeds`` with a soft prefix (BLIP-2) in front of text.
        """
        return self.token_embed(tokens)

    def logits_from_hidden(self, hidden):
        """Final hidden states ``[B, T, E]`` (`TextOutput.hidden`) -> f32 logits ``[B, T, V]``."""
        if self.config.tie_embeddings:
            return self.token_embed.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    @nn.compact
    def __call__(self, tokens=None, *, attention_mask=None, position_ids=None, inputs_embeds=None,
                 layer_callback: LayerCallback | None = None, output_hidden_states: bool = False,
                 deterministic: bool = True, decode: bool = False, key_valid=None) -> TextOutput:
        """Forward pass (full sequence, or new tokens against the KV cache).

        Args:
          tokens: int ``[B, T]``; or None with ``inputs_embeds [B, T, E]`` (word embeddings,
            e.g. `embed_tokens` output with a soft prefix; positions are still added).
          attention_mask: ``[B, T]`` 1 = real token, 0 = padding (left padding for prompts).
            Masks padded keys and sets the default position ids. Not used with ``decode``.
          position_ids: int ``[B, T]`` (default: from ``attention_mask``, else ``arange(T)``).
          layer_callback: ``f(i, x [B, T, D]) -> [B, T, D]`` applied before block ``i``
            (Flamingo's gated cross-attention; called inside this module's scope, so any
            Flax module it calls must belong to the caller, e.g. submodules of the parent).
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
            _check_tokens(tokens, "tokens")
            x = self.embed_tokens(tokens)
        else:
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != c.word_dim:
                raise ValueError(f"inputs_embeds must be [B, T, E={c.word_dim}]; got {inputs_embeds.shape}.")
            x = inputs_embeds.astype(self.dtype)
        b, t = x.shape[0], x.shape[1]
        if decode and key_valid is not None and position_ids is None:
            raise ValueError("DecoderLM(decode=True): pass position_ids [B, T] of the new tokens (they cannot be "
                             "inferred from the cache); vlm_jax.generate does this for you.")
        if position_ids is None:
            position_ids = (positions_from_mask(attention_mask) if attention_mask is not None
                            else jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
        if position_ids.shape != (b, t) and position_ids.shape != (1, t):
            raise ValueError(f"position_ids must be [B, T] = [{b}, {t}]; got {position_ids.shape}.")
        if not decode and t > c.max_positions:
            raise ValueError(f"sequence length {t} exceeds DecoderLMConfig.max_positions={c.max_positions} "
                             "(the learned position table); truncate the input.")
        if c.word_dim != c.width:
            x = self.project_in(x)
        x = x + self.position_embed(position_ids + c.position_offset)
        x = self.drop(x, deterministic=deterministic)

        if decode:
            kv = jnp.ones((b, t), bool) if key_valid is None else key_valid
            mask = masks_lib.padding_mask(kv)                     # [B, 1, 1, S] (+ causal cache mask)
        else:
            # Causality goes to the attention kernel (`is_causal`), not a [T, T] mask array: on GPU
            # the cuDNN kernel then skips masked blocks instead of adding a dense bias.
            mask = None
            if attention_mask is not None:
                if attention_mask.shape != (b, t):
                    raise ValueError(f"attention_mask must be [B, T] = [{b}, {t}]; got {attention_mask.shape}.")
                mask = masks_lib.padding_mask(attention_mask)

        block = dataclasses.replace(c.block_config(), causal=not decode)
        hidden = [x]
        for i in range(c.num_layers):
            if layer_callback is not None:
                x = layer_callback(i, x)
            x = _make_block(block, remat=c.remat, deterministic=deterministic, decode=decode,
                            dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(
                x, mask, None, None, None, None)
            hidden.append(x)
        if c.final_norm:
            x = self.final_norm(x)
        if c.word_dim != c.width:
            x = self.project_out(x)
        return TextOutput(logits=self.logits_from_hidden(x), hidden=x,
                          hidden_states=tuple(hidden) if output_hidden_states else None)


# ================================================================================= BERT
@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT-style encoder (BertModel) with optional cross-attention layers.

    vocab_size: V. width: D. num_layers: L. num_heads: H. mlp_dim: F. max_positions: P.
    type_vocab_size: token-type (segment) rows. activation: 'gelu' (exact; BERT).
    norm_eps: LayerNorm epsilon (1e-12). pooler: add the tanh pooler on token 0.
    cross_attention_layers: indices of layers with a cross-attention sub-block
      (keys/values from ``encoded [B, S, Dc]``); ``cross_attention_every=n`` is shorthand for
      layers 0, n, 2n, ... (BLIP-2's Q-Former: every 2nd layer). Both empty for BertModel.
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
    remat: bool = False

    def __post_init__(self):
        _check_config_positive(self, ("vocab_size", "width", "num_layers", "num_heads", "mlp_dim",
                                      "max_positions", "type_vocab_size"))
        if self.width % self.num_heads:
            raise ValueError(f"BertConfig.width={self.width} must be divisible by num_heads={self.num_heads}.")
        if self.cross_attention_every < 0:
            raise ValueError(f"BertConfig.cross_attention_every must be >= 0; got {self.cross_attention_every}.")
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"BertConfig.cross_attention_layers {bad} out of range for {self.num_layers} layers.")
        self.block_config(0)

    def has_cross_attention(self, i: int) -> bool:
        every = self.cross_attention_every
        return i in self.cross_attention_layers or (every > 0 and i % every == 0)

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
    in cross-attention layers), ``pooler/kernel [D, D]``, ``pooler/bias``.
    """
    config: BertConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.word_embed = _embed(c.vocab_size, c.width, ("vocab", "embed"), name="word_embed", **kw)
        self.position_embed = _embed(c.max_positions, c.width, ("positions", "embed"), name="position_embed", **kw)
        self.type_embed = _embed(c.type_vocab_size, c.width, ("positions", "embed"), name="type_embed", **kw)
        self.embed_norm = LayerNorm(c.norm_eps, name="embed_norm", **kw)
        if c.pooler:
            self.pooler = Dense(c.width, ("embed", "hidden"), name="pooler", **kw)
        self.drop = nn.Dropout(c.dropout_rate)

    def embed(self, tokens=None, *, token_type_ids=None, position_ids=None, inputs_embeds=None,
              deterministic: bool = True):
        """Word (or ``inputs_embeds``) + position + token-type embeddings, normed: ``[B, T, D]``."""
        c = self.config
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("BertEncoder: pass exactly one of tokens [B, T] or inputs_embeds [B, T, D].")
        if tokens is not None:
            _check_tokens(tokens, "tokens")
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

    @nn.compact
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
        any_cross = any(c.has_cross_attention(i) for i in range(c.num_layers))
        if any_cross and encoded is None:
            raise ValueError("BertConfig has cross-attention layers: pass encoded=[B, S, Dc].")
        if not any_cross and encoded is not None:
            raise ValueError("encoded was given but BertConfig has no cross-attention layers "
                             "(set cross_attention_layers or cross_attention_every).")
        hidden = [x]
        for i in range(c.num_layers):
            cross = c.has_cross_attention(i)
            x = _make_block(c.block_config(i), remat=c.remat, deterministic=deterministic, decode=False,
                            dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(
                x, mask, encoded if cross else None, cross_mask if cross else None, None, None)
            hidden.append(x)
        return x, (tuple(hidden) if output_hidden_states else None)

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


# =================================================================================== T5
def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> jax.Array:
    """T5 bucket ids of signed distances ``key position - query position`` (any int shape).

    Distances below ``n // 2`` (n = buckets per direction: ``num_buckets // 2`` when
    bidirectional, else ``num_buckets``) get one bucket each; larger ones share
    logarithmically wider buckets up to ``max_distance``; beyond it all fall in the last.
    Bidirectional (encoder): keys after the query use the upper half of the buckets.
    Causal (decoder): only distance into the past counts; keys after the query map to 0.
    Returns int32 of the same shape, values in ``[0, num_buckets)``.
    """
    rel = jnp.asarray(relative_position).astype(jnp.int32)
    if bidirectional:
        n = num_buckets // 2
        offset = jnp.where(rel > 0, n, 0).astype(jnp.int32)
        distance = jnp.abs(rel)
    else:
        n = num_buckets
        offset = jnp.zeros_like(rel)
        distance = jnp.maximum(-rel, 0)
    exact = n // 2
    # log-spaced buckets for distance >= exact; float32, like the reference implementations.
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / math.log(max_distance / exact)
    far = jnp.minimum(exact + (log_ratio * (n - exact)).astype(jnp.int32), n - 1)
    return offset + jnp.where(distance < exact, distance, far)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 encoder-decoder.

    vocab_size: V. width: D (d_model). num_heads: H. head_dim: K (d_kv; H*K may differ from D).
    mlp_dim: F (d_ff). num_layers / num_decoder_layers: L_enc / L_dec (default L_enc).
    num_buckets / max_distance: relative position buckets. norm_eps: RMS norm epsilon.
    activation: 'gated_gelu' (v1.1 / Flan-T5) | 'relu' (v1.0) | any MLP activation.
    tie_lm_head: logits from the shared embedding (v1.0); False: a separate
      ``lm_head [D, V]`` (v1.1 / Flan-T5).
    scale_decoder_output: multiply the decoder output by D**-0.5 before the head (v1.0,
      which ties the head); None = same as ``tie_lm_head``.
    """
    vocab_size: int
    width: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    num_layers: int
    num_decoder_layers: int | None = None
    num_buckets: int = 32
    max_distance: int = 128
    norm_eps: float = 1e-6
    activation: str = "gated_gelu"
    tie_lm_head: bool = False
    scale_decoder_output: bool | None = None
    dropout_rate: float = 0.0
    implementation: str | None = None
    remat: bool = False

    def __post_init__(self):
        _check_config_positive(self, ("vocab_size", "width", "num_heads", "head_dim", "mlp_dim", "num_layers",
                                      "num_buckets", "max_distance"))
        if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
            raise ValueError(f"T5Config.num_decoder_layers must be positive; got {self.num_decoder_layers}.")
        self.block_config(cross=True)

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    def block_config(self, cross: bool) -> BlockConfig:
        return BlockConfig(
            num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim, activation=self.activation,
            norm_position="pre", norm_type="rmsnorm", norm_eps=self.norm_eps, attn_bias=False,
            attn_out_bias=False, mlp_bias=False, attention_scale=1.0, cross_attention=cross,
            dropout_rate=self.dropout_rate, mlp_dropout_rate=self.dropout_rate,
            implementation=self.implementation)

    @classmethod
    def flan_t5(cls, size: str = "xl", **kw) -> "T5Config":
        """google/flan-t5-{small,base,large,xl,xxl} (same shapes as t5-v1_1-*)."""
        shapes = {"small": (512, 6, 64, 1024, 8, 8), "base": (768, 12, 64, 2048, 12, 12),
                  "large": (1024, 16, 64, 2816, 24, 24), "xl": (2048, 32, 64, 5120, 24, 24),
                  "xxl": (4096, 64, 64, 10240, 24, 24)}
        if size not in shapes:
            raise ValueError(f"T5Config.flan_t5(size={size!r}); choose one of {sorted(shapes)}.")
        d, h, k, f, le, ld = shapes[size]
        return cls(**{**dict(vocab_size=32128, width=d, num_heads=h, head_dim=k, mlp_dim=f, num_layers=le,
                             num_decoder_layers=ld), **kw})


class T5Stack(nn.Module):
    """One T5 stack (encoder or decoder) on embedded inputs ``x [B, T, D]`` -> ``[B, T, D]``.

    Parameters: ``relative_bias/embedding [R, H]`` ('positions', 'heads'), ``layers_i/...``,
    ``final_norm/scale``.
    """
    config: T5Config
    causal: bool
    num_layers: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.relative_bias = _embed(c.num_buckets, c.num_heads, ("positions", "heads"), name="relative_bias", **kw)
        self.final_norm = RMSNorm(c.norm_eps, name="final_norm", **kw)
        self.drop = nn.Dropout(c.dropout_rate)

    def position_bias(self, query_pos, key_pos):
        """``query_pos [B|1, T]``, ``key_pos [B|1, S]`` -> additive bias ``[B|1, H, T, S]``."""
        c = self.config
        buckets = relative_position_bucket(key_pos[:, None, :] - query_pos[:, :, None],
                                           bidirectional=not self.causal, num_buckets=c.num_buckets,
                                           max_distance=c.max_distance)
        return jnp.transpose(self.relative_bias(buckets), (0, 3, 1, 2))

    @nn.compact
    def __call__(self, x, mask, *, encoded=None, cross_mask=None, query_pos=None, key_pos=None,
                 output_hidden_states: bool = False, deterministic: bool = True, decode: bool = False):
        """x ``[B, T, D]``; mask bool rank 4; query/key positions for the relative bias
        (default ``arange``); encoded ``[B, S, D]`` for the decoder's cross-attention (with
        ``decode=True``: stored in the cross-attention cache; None reuses that cache).
        Returns (``[B, T, D]`` after the final norm, hidden states tuple or None)."""
        c = self.config
        t = x.shape[1]
        if query_pos is None:
            query_pos = jnp.arange(t, dtype=jnp.int32)[None]
        if key_pos is None:
            key_pos = jnp.arange(t, dtype=jnp.int32)[None]
        bias = self.position_bias(query_pos, key_pos)
        block = c.block_config(cross=self.causal)
        x = self.drop(x, deterministic=deterministic)
        hidden = [x]
        for i in range(self.num_layers):
            x = _make_block(block, remat=c.remat, deterministic=deterministic, decode=decode,
                            dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(
                x, mask, encoded, cross_mask, bias, None)
            hidden.append(x)
        x = self.drop(self.final_norm(x), deterministic=deterministic)
        return x, (tuple(hidden) if output_hidden_states else None)


class T5Output(NamedTuple):
    """logits f32 ``[B, T, V]``; decoder_hidden ``[B, T, D]`` (final-normed); encoded ``[B, S, D]``;
    decoder/encoder_hidden_states: tuples of L+1 block inputs/outputs, or None."""
    logits: jax.Array
    decoder_hidden: jax.Array
    encoded: jax.Array
    decoder_hidden_states: tuple[jax.Array, ...] | None = None
    encoder_hidden_states: tuple[jax.Array, ...] | None = None


class T5(nn.Module):
    """T5 encoder-decoder: ``(input_tokens [B, S], decoder_tokens [B, T])`` -> `T5Output`.

    Parameters: ``shared/embedding [V, D]`` ('vocab', 'embed'), ``encoder/...``,
    ``decoder/...`` (`T5Stack`), ``lm_head/kernel [D, V]`` (untied only).
    Methods: `encode` (encoder), `run_decoder` (decoder + head, optionally with the KV cache),
    `__call__` (both).
    """
    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.shared = _embed(c.vocab_size, c.width, ("vocab", "embed"), name="shared", init=nn.initializers.normal(1.0),
                             **kw)
        self.encoder = T5Stack(c, causal=False, num_layers=c.num_layers, name="encoder", **kw)
        self.decoder = T5Stack(c, causal=True, num_layers=c.decoder_layers, name="decoder", **kw)
        if not c.tie_lm_head:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head", **kw)

    def embed_tokens(self, tokens):
        """``tokens [B, T]`` -> shared embeddings ``[B, T, D]`` (to build ``inputs_embeds``)."""
        return self.shared(tokens)

    def encode(self, tokens=None, *, attention_mask=None, inputs_embeds=None, output_hidden_states: bool = False,
               deterministic: bool = True):
        """Encoder: ``tokens [B, S]`` (or ``inputs_embeds [B, S, D]``), ``attention_mask [B, S]``
        -> (encoded ``[B, S, D]``, hidden states or None)."""
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("T5.encode: pass exactly one of tokens [B, S] or inputs_embeds [B, S, D].")
        if tokens is not None:
            _check_tokens(tokens, "tokens")
            x = self.embed_tokens(tokens)
        else:
            x = inputs_embeds.astype(self.dtype)
        mask = None if attention_mask is None else masks_lib.padding_mask(attention_mask)
        return self.encoder(x, mask, output_hidden_states=output_hidden_states, deterministic=deterministic)

    def run_decoder(self, decoder_tokens, encoded=None, *, encoder_mask=None, decoder_mask=None,
                    output_hidden_states: bool = False, deterministic: bool = True, decode: bool = False,
                    key_valid=None, query_pos=None):
        """Decoder + LM head.

        Args:
          decoder_tokens: int ``[B, T]`` (starting with the decoder start token, = pad 0 in T5).
          encoded: ``[B, S, D]`` encoder output; encoder_mask ``[B, S]`` (1 = real; pass it
            with every call, also while decoding from the cross-attention cache).
          decoder_mask: ``[B, T]`` padding of the decoder tokens (full forward only).
          decode: use the KV cache ('cache' collection, made by
            `vlm_jax.layers.attention.init_cache`); then ``query_pos`` int ``[B, T]`` gives the
            cache slots of the new tokens (for the relative bias) and ``key_valid [B, Sc]``
            which cache slots may be attended (default all; the causal part is added by the
            attention layer). Cross-attention: a given ``encoded`` is projected and stored in
            the cache (``cached_cross_key/value``); ``encoded=None`` reuses the stored
            keys/values, so decoding steps need neither the encoder output nor its projection.
        Returns:
          (logits f32 ``[B, T, V]``, decoder hidden ``[B, T, D]``, hidden states or None).
        """
        c = self.config
        _check_tokens(decoder_tokens, "decoder_tokens")
        if encoded is None and not decode:
            raise ValueError("T5.run_decoder: pass encoded=[B, S, D] (the encoder output); only decode=True may omit "
                             "it, to reuse the cross-attention KV cache.")
        b, t = decoder_tokens.shape
        x = self.embed_tokens(decoder_tokens)
        cross_mask = None if encoder_mask is None else masks_lib.padding_mask(encoder_mask)
        if decode:
            kv = jnp.ones((b, t), bool) if key_valid is None else key_valid
            mask = masks_lib.padding_mask(kv)
            q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if query_pos is None else query_pos
            k_pos = jnp.arange(kv.shape[1], dtype=jnp.int32)[None]
        else:
            mask = masks_lib.causal_mask(t)
            if decoder_mask is not None:
                mask = masks_lib.combine(mask, masks_lib.padding_mask(decoder_mask))
            q_pos = k_pos = None
        h, hidden = self.decoder(x, mask, encoded=encoded, cross_mask=cross_mask, query_pos=q_pos, key_pos=k_pos,
                                 output_hidden_states=output_hidden_states, deterministic=deterministic,
                                 decode=decode)
        scale = c.tie_lm_head if c.scale_decoder_output is None else c.scale_decoder_output
        head_in = h * (c.width ** -0.5) if scale else h
        logits = self.shared.attend(head_in) if c.tie_lm_head else self.lm_head(head_in)
        return logits.astype(jnp.float32), h, hidden

    def __call__(self, input_tokens, decoder_tokens, *, attention_mask=None, decoder_mask=None,
                 output_hidden_states: bool = False, deterministic: bool = True) -> T5Output:
        """Full forward (teacher forcing): ``input_tokens [B, S]``, ``decoder_tokens [B, T]``."""
        encoded, enc_hidden = self.encode(input_tokens, attention_mask=attention_mask,
                                          output_hidden_states=output_hidden_states, deterministic=deterministic)
        logits, h, dec_hidden = self.run_decoder(decoder_tokens, encoded, encoder_mask=attention_mask,
                                                 decoder_mask=decoder_mask, output_hidden_states=output_hidden_states,
                                                 deterministic=deterministic)
        return T5Output(logits=logits, decoder_hidden=h, encoded=encoded, decoder_hidden_states=dec_hidden,
                        encoder_hidden_states=enc_hidden)
