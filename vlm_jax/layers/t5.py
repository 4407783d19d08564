"""T5 encoder-decoder (T5 v1.0 / v1.1 / Flan-T5) on the shared `TransformerStack`.

Dimension letters: B batch (N = batch*beam while decoding), T decoder length, S encoder
length (Sc: the decoder KV-cache length), D width, H heads, K head dim, F FFN width,
V vocabulary, R relative-position buckets, L layers.

RMS "T5 LayerNorm", relative position buckets (bidirectional in the encoder, causal in the
decoder) whose bias table lives in each stack (``relative_bias``, HF: the first layer's) and
is shared by all its layers, no 1/sqrt(K) scaling, gated-GELU (v1.1) or ReLU (v1.0) FFN,
shared input embedding, untied or tied (then rescaled by D**-0.5) LM head; decoder KV cache
for generation: self-attention keys/values per step, cross-attention keys/values of the
encoder output stored once (a ``decode=True`` call with ``encoded`` fills them, later ones
pass ``encoded=None``). Logits are returned in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.layers import masks as masks_lib
from vlm_jax.layers.mlp import Dense
from vlm_jax.layers.norms import RMSNorm
from vlm_jax.layers.text_common import check_config_positive, check_tokens, embed_table
from vlm_jax.layers.transformer import BlockConfig, TransformerStack, check_remat_policy

__all__ = ["T5", "T5Config", "T5Output", "T5Stack", "relative_position_bucket"]


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
    scan_layers: each stack (encoder, decoder) is one `nn.scan` over its layers (params
      ``{encoder,decoder}/layers/...`` stacked on a leading 'layers' axis).
    remat_policy: one of `vlm_jax.layers.transformer.REMAT_POLICIES`.
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
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        check_config_positive(self, ("vocab_size", "width", "num_heads", "head_dim", "mlp_dim", "num_layers",
                                      "num_buckets", "max_distance"))
        if self.num_decoder_layers is not None and self.num_decoder_layers <= 0:
            raise ValueError(f"T5Config.num_decoder_layers must be positive; got {self.num_decoder_layers}.")
        self.block_config(cross=True)
        check_remat_policy(self.remat_policy, field="T5Config.remat_policy")

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

    Parameters: ``relative_bias/embedding [R, H]`` ('positions', 'heads'), ``layers_i/...``
    (scanned: ``layers/...``), ``final_norm/scale``. The relative-position bias is computed
    once and given to every layer.
    """
    config: T5Config
    causal: bool
    num_layers: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.relative_bias = embed_table(c.num_buckets, c.num_heads, ("positions", "heads"), name="relative_bias", **kw)
        self.final_norm = RMSNorm(c.norm_eps, name="final_norm", **kw)
        self.drop = nn.Dropout(c.dropout_rate)
        self.stack = TransformerStack(c.block_config(cross=self.causal), self.num_layers, scan_layers=c.scan_layers,
                                      remat_policy=c.remat_policy, **kw)
        nn.share_scope(self, self.stack)           # layers_i live next to relative_bias / final_norm

    def position_bias(self, query_pos, key_pos):
        """``query_pos [B|1, T]``, ``key_pos [B|1, S]`` -> additive bias ``[B|1, H, T, S]``."""
        c = self.config
        buckets = relative_position_bucket(key_pos[:, None, :] - query_pos[:, :, None],
                                           bidirectional=not self.causal, num_buckets=c.num_buckets,
                                           max_distance=c.max_distance)
        return jnp.transpose(self.relative_bias(buckets), (0, 3, 1, 2))

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
        x = self.drop(x, deterministic=deterministic)
        x, hidden = self.stack(x, mask, encoded=encoded, cross_mask=cross_mask, attn_bias=bias,
                               deterministic=deterministic, decode=decode, output_hidden_states=output_hidden_states)
        return self.drop(self.final_norm(x), deterministic=deterministic), hidden


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
        self.shared = embed_table(c.vocab_size, c.width, ("vocab", "embed"), name="shared", init=nn.initializers.normal(1.0),
                             **kw)
        self.encoder = T5Stack(c, causal=False, num_layers=c.num_layers, name="encoder", **kw)
        self.decoder = T5Stack(c, causal=True, num_layers=c.decoder_layers, name="decoder", **kw)
        if not c.tie_lm_head:
            self.lm_head = Dense(c.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head", **kw)

    def embed_tokens(self, tokens):
        """``tokens [B, T]`` -> shared embeddings ``[B, T, D]`` (to build ``inputs_embeds``)."""
        return self.shared(tokens)

    def embed_mixture(self, weights):
        """``weights [B, T, V]`` (distributions over the vocabulary) -> ``[B, T, D]``: each row the
        weighted mean of the shared embeddings (a soft token inside the words' convex hull)."""
        table = jnp.asarray(self.shared.embedding, self.dtype)
        return jnp.einsum("btv,vd->btd", weights.astype(self.dtype), table)

    def encode(self, tokens=None, *, attention_mask=None, inputs_embeds=None, output_hidden_states: bool = False,
               deterministic: bool = True):
        """Encoder: ``tokens [B, S]`` (or ``inputs_embeds [B, S, D]``), ``attention_mask [B, S]``
        -> (encoded ``[B, S, D]``, hidden states or None)."""
        if (tokens is None) == (inputs_embeds is None):
            raise ValueError("T5.encode: pass exactly one of tokens [B, S] or inputs_embeds [B, S, D].")
        if tokens is not None:
            check_tokens(tokens, "tokens")
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
        check_tokens(decoder_tokens, "decoder_tokens")
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
