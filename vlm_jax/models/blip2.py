"""BLIP-2 (Li et al. 2023): a frozen image encoder, the Querying Transformer (Q-Former) and its
stage-1 heads (image-text contrastive, matching and generation).

Dimension letters: B batch, S image side, Nv image tokens (patches + [CLS]), Dv image-encoder
width, Q learned queries, T text length, N = Q' + T positions in one Q-Former pass (Q' = Q when
the image is given, else 0), D Q-Former width, H heads, F FFN width, E ITC embedding width
(256 in the paper), V vocabulary.

The mechanism, in the paper's terms (section 3.1, figure 2):

  image features     f = LN_vision(ViT(image))             [B, Nv, Dv]   frozen ViT (penultimate
                                                                         layer for a full CLIP /
                                                                         EVA tower), trainable LN
                                                                         in f32
  Q-Former pass      h = QFormer([queries; text], f, mask)  [B, N, D]
                     - BERT-shaped post-LN blocks; ``queries`` [Q, D] are learned, with no
                       position embedding; text = word + position embeddings; one LayerNorm
                       over the concatenation
                     - self-attention is shared by queries and text; the *mask* decides who
                       sees whom (`vlm_jax.layers.masks`: ITC unimodal, ITM bidirectional,
                       ITG multimodal-causal)
                     - every ``cross_attention_every``-th layer (0, k, 2k, ..) lets the *query*
                       positions (only) cross-attend to f
                     - the query positions have their own FFN (`QFormerBlock`), initialised as
                       a copy of the text FFN when the Q-Former starts from BERT
  ITC                image z_q = norm(W_v h_q)   [B, Q, E];  text z_t = norm(W_t h_[CLS])  [B, E]
                     s(I, T) = max_q z_q . z_t / tau      (tau learnable, clamped to [0.001, 0.5])
  ITM                p(match) = softmax(mean_q W_itm h_q)  over a bidirectional pass  [B, 2]
  ITG                text decoding from [DEC] through the multimodal-causal pass, BERT LM head
                     tied to the word embeddings  [B, T, V]

The losses that combine these live in `vlm_jax.objectives.blip2`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.layers import masks as masks_lib
from vlm_jax.layers.bert import BertConfig
from vlm_jax.layers.mlp import MLP, Dense, activation_fn
from vlm_jax.layers.norms import LayerNorm, make_norm
from vlm_jax.layers.text_common import check_tokens, embed_table
from vlm_jax.layers.transformer import ACT_AXES, TransformerBlock, TransformerStack

__all__ = ["QFormerConfig", "QFormerBlock", "QFormer", "Blip2Config", "Blip2QFormerModel", "l2_normalize",
           "TEMPERATURE_RANGE"]

TEMPERATURE_RANGE = (0.001, 0.5)        # the ITC temperature is clamped to this after every update


def l2_normalize(x, eps: float = 1e-12):
    """``x / max(||x||, eps)`` over the last axis (torch.nn.functional.normalize), in f32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """The Q-Former's shape (paper: BERT-base, 32 queries, cross-attention every 2nd layer).

    num_queries: Q. width, num_layers, num_heads, mlp_dim: D, L, H, F. vocab_size: V (BERT's
    30522 + [DEC]). max_positions: text position table rows. cross_attention_every: k
    (layers 0, k, 2k, .. cross-attend). text_input: False builds the image-only Q-Former of
    HF's ``Blip2ForConditionalGeneration`` (no word/position embeddings, no text FFN, no LM
    head). lm_head: the ITG head (BERT ``cls.predictions``: dense + GELU + LN, decoder tied to
    the word embeddings, own bias).
    """
    num_queries: int = 32
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    vocab_size: int = 30523
    max_positions: int = 512
    cross_attention_every: int = 2
    norm_eps: float = 1e-12
    activation: str = "gelu"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    text_input: bool = True
    lm_head: bool = True
    implementation: str | None = None
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self):
        if self.num_queries <= 0:
            raise ValueError(f"QFormerConfig.num_queries must be positive; got {self.num_queries}.")
        if self.cross_attention_every <= 0:
            raise ValueError("QFormerConfig.cross_attention_every must be >= 1 (the Q-Former reads the image "
                             f"through its cross-attention layers); got {self.cross_attention_every}.")
        if self.lm_head and not self.text_input:
            raise ValueError("QFormerConfig.lm_head=True needs text_input=True (the head is tied to the word "
                             "embeddings).")
        self.bert()

    def bert(self) -> BertConfig:
        """The BERT layer layout the Q-Former shares (validated there; no token types, no pooler)."""
        return BertConfig(vocab_size=self.vocab_size, width=self.width, num_layers=self.num_layers,
                          num_heads=self.num_heads, mlp_dim=self.mlp_dim, max_positions=self.max_positions,
                          activation=self.activation, norm_eps=self.norm_eps, pooler=False,
                          cross_attention_every=self.cross_attention_every, dropout_rate=self.dropout_rate,
                          attention_dropout_rate=self.attention_dropout_rate, implementation=self.implementation,
                          scan_layers=self.scan_layers, remat_policy=self.remat_policy)

    @classmethod
    def paper(cls, **kw) -> "QFormerConfig":
        """The paper's Q-Former: BERT-base (12 x 768, 12 heads, FFN 3072), 32 queries, cross-attention
        every 2nd layer, vocabulary 30522 + [DEC]."""
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class Blip2Config:
    """Stage-1 model around the Q-Former.

    embed_dim: E (ITC projection width, 256). feature_layer: which hidden state of the image
    encoder feeds the Q-Former (-1: its last layer, raw — e.g. HF's Blip2VisionModel, already
    cut to 39 of EVA's 40 blocks; -2: the penultimate layer of a full CLIP / EVA tower).
    vision_norm_eps: epsilon of the trainable ``ln_vision``. init_temperature: tau at init.
    """
    qformer: QFormerConfig = QFormerConfig()
    embed_dim: int = 256
    feature_layer: int = -1
    vision_norm_eps: float = 1e-6
    init_temperature: float = 0.07

    def __post_init__(self):
        lo, hi = TEMPERATURE_RANGE
        if not lo <= self.init_temperature <= hi:
            raise ValueError(f"Blip2Config.init_temperature={self.init_temperature} is outside the clamp range "
                             f"[{lo}, {hi}].")
        if self.embed_dim <= 0:
            raise ValueError(f"Blip2Config.embed_dim must be positive; got {self.embed_dim}.")


# ------------------------------------------------------------------------------ block
class QFormerBlock(TransformerBlock):
    """One Q-Former layer over ``[queries; text]`` ``[B, Q' + T, D]`` (post-LN, as BERT).

    ``query_length`` = Q' (0 for a text-only pass) is set per call through
    ``TransformerStack(block_kwargs=...)``; it never changes the parameters:

      x = N1(x + SelfAttn(x, mask))                                 all N positions
      x_q = N2(x_q + CrossAttn(x_q, image))   [cross layers only]   the Q' query positions
      x_q = N_q(x_q + FFN_q(x_q));  x_t = N3(x_t + FFN(x_t))        separate FFNs

    Parameters: the `TransformerBlock` ones (``attn``, ``attn_norm``, ``cross_attn``,
    ``cross_norm``, ``mlp``, ``mlp_norm``) plus ``query_mlp`` and ``query_mlp_norm``. With
    ``text_params=False`` (HF's image-only Q-Former) the text FFN (``mlp``, ``mlp_norm``) is
    never created.
    """
    query_length: int = 0
    text_params: bool = True

    def setup(self):
        super().setup()
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.query_mlp_norm = make_norm(c.norm_type, c.norm_eps, **kw)
        self.query_mlp = MLP(hidden_dim=c.mlp_dim, activation=c.activation, use_bias=c.mlp_bias,
                             dropout_rate=c.mlp_dropout_rate, **kw)

    def check_encoded(self, encoded, decode: bool):
        if self.query_length == 0:          # text-only pass: no query reads the image
            return
        super().check_encoded(encoded, decode)

    def cross_attention_sublayer(self, x, encoded, mask, bias, *, deterministic: bool, decode: bool):
        q = self.query_length
        if q == 0:
            return x
        rows = lambda m: m if m is None or m.shape[-2] == 1 else m[..., :q, :]  # noqa: E731  query rows only
        xq = self.residual(x[:, :q], self.cross_norm, lambda h: self.cross_attn(
            h, encoded, mask=rows(mask), bias=rows(bias), deterministic=deterministic), deterministic)
        return jnp.concatenate([xq, x[:, q:]], axis=1)

    def mlp_sublayer(self, x, *, deterministic: bool):
        q = self.query_length
        text = lambda h: self.residual(h, self.mlp_norm, lambda y: self.mlp(y, deterministic=deterministic),  # noqa: E731
                                       deterministic)
        if q == 0:
            return text(x)
        xq = self.residual(x[:, :q], self.query_mlp_norm,
                           lambda y: self.query_mlp(y, deterministic=deterministic), deterministic)
        if x.shape[1] == q:
            if self.text_params and self.is_initializing():
                text(x[:, :0])            # create the text FFN's params in an image-only init
            return xq
        return jnp.concatenate([xq, text(x[:, q:])], axis=1)


# ---------------------------------------------------------------------------- Q-Former
class QFormer(nn.Module):
    """The Querying Transformer: (image features, text) -> hidden states of ``[queries; text]``.

    Parameters: ``query_tokens [Q, D]`` ('queries', 'embed'); ``word_embed [V, D]`` and
    ``position_embed [P, D]`` (``text_input``); ``embed_norm``; ``layers_i/...`` (`QFormerBlock`;
    scanned: ``layers/block_j/...``); ``lm_head/{transform, transform_norm, bias [V]}``
    (``lm_head``). The names follow `vlm_jax.layers.bert.BertEncoder`, so a BERT checkpoint maps
    onto the shared parts.
    """
    config: QFormerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.query_tokens = self.param(
            "query_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("queries", "embed")),
            (c.num_queries, c.width), self.param_dtype)
        if c.text_input:
            self.word_embed = embed_table(c.vocab_size, c.width, ("vocab", "embed"), name="word_embed", **kw)
            self.position_embed = embed_table(c.max_positions, c.width, ("positions", "embed"),
                                              name="position_embed", **kw)
        self.embed_norm = LayerNorm(c.norm_eps, name="embed_norm", **kw)
        self.drop = nn.Dropout(c.dropout_rate)
        self.stack = TransformerStack(c.bert().layer_pattern(), c.num_layers, scan_layers=c.scan_layers,
                                      remat_policy=c.remat_policy, block_cls=QFormerBlock, **kw)
        nn.share_scope(self, self.stack)           # layers_i next to the embeddings, as BertEncoder
        if c.lm_head:
            self.lm_transform = Dense(c.width, ("embed", "hidden"), name="lm_transform", **kw)
            self.lm_transform_norm = LayerNorm(c.norm_eps, name="lm_transform_norm", **kw)
            self.lm_bias = self.param("lm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                                      (c.vocab_size,), self.param_dtype)

    def embed(self, batch_size: int, tokens, with_queries: bool, deterministic: bool):
        """LN([queries; word + position]) ``[B, Q' + T, D]`` (text positions count from 0)."""
        c = self.config
        parts = []
        if with_queries:
            parts.append(jnp.broadcast_to(jnp.asarray(self.query_tokens, self.dtype),
                                          (batch_size, c.num_queries, c.width)))
        if tokens is not None:
            if not c.text_input:
                raise ValueError("This Q-Former has no text input (QFormerConfig.text_input=False); pass only "
                                 "image features.")
            check_tokens(tokens, "tokens")
            t = tokens.shape[1]
            if t > c.max_positions:
                raise ValueError(f"text length {t} exceeds QFormerConfig.max_positions={c.max_positions}.")
            parts.append(self.word_embed(tokens) + self.position_embed(jnp.arange(t)[None]))
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        return self.drop(self.embed_norm(x), deterministic=deterministic)

    def __call__(self, image_feats=None, tokens=None, *, mask=None, deterministic: bool = True,
                 output_hidden_states: bool = False):
        """One Q-Former pass.

        Args:
          image_feats: ``[B, Nv, Dv]`` (normalised image-encoder features) or None for a
            text-only pass. The Q learned queries are in the sequence iff it is given.
          tokens: ``[B, T]`` int or None (queries only).
          mask: bool ``[B|1, 1, N, N]`` over the N = Q' + T positions (`vlm_jax.layers.masks`
            ``qformer_*_mask`` or ``padding_mask``); None lets every position see every position.
        Returns ``(hidden [B, N, D], hidden_states or None)``.
        """
        if image_feats is None and tokens is None:
            raise ValueError("QFormer needs image_feats [B, Nv, Dv], tokens [B, T], or both.")
        b = (image_feats if image_feats is not None else tokens).shape[0]
        q = self.config.num_queries if image_feats is not None else 0
        x = self.embed(b, tokens, image_feats is not None, deterministic)
        x = nn.with_logical_constraint(x, ACT_AXES)
        return self.stack(x, mask, encoded=image_feats, deterministic=deterministic,
                          output_hidden_states=output_hidden_states,
                          block_kwargs={"query_length": q, "text_params": self.config.text_input})

    def lm_logits(self, hidden):
        """BERT LM head: ``[B, T, D]`` -> f32 ``[B, T, V]`` (decoder tied to ``word_embed``)."""
        c = self.config
        h = self.lm_transform_norm(activation_fn(c.activation)(self.lm_transform(hidden)))
        logits = self.word_embed.attend(h.astype(self.dtype)) + jnp.asarray(self.lm_bias, self.dtype)
        return logits.astype(jnp.float32)


# ------------------------------------------------------------------------ stage-1 model
class Blip2QFormerModel(nn.Module):
    """Stage 1: frozen image encoder + ``ln_vision`` + Q-Former + ITC/ITM/ITG heads.

    Parameters: ``vision/...`` (the image encoder, e.g. `VisionTransformer`; frozen by the task's
    optimizer groups), ``ln_vision`` (f32), ``qformer/...`` (`QFormer`), ``vision_proj [D, E]``,
    ``text_proj [D, E]``, ``itm_head [D, 2]``, ``temp`` (scalar tau).

    ``vision`` is called as ``vision(images, output_layer=feature_layer, apply_final_norm=False)``
    and must return an object with ``features [B, Nv, Dv]``.
    """
    vision: nn.Module
    config: Blip2Config
    dtype: Any = jnp.float32            # Q-Former compute dtype (its params stay f32 masters)
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_vision = LayerNorm(c.vision_norm_eps, name="ln_vision")            # f32 compute and params
        self.qformer = QFormer(c.qformer, name="qformer", **kw)
        self.vision_proj = Dense(c.embed_dim, ("embed", None), name="vision_proj", **kw)
        self.text_proj = Dense(c.embed_dim, ("embed", None), name="text_proj", **kw)
        self.itm_head = Dense(2, ("embed", None), name="itm_head", **kw)
        self.temp = self.param("temp", lambda _: jnp.asarray(c.init_temperature, jnp.float32))

    # ----------------------------------------------------------------- the three inputs
    def image_features(self, images):
        """``images [B, S, S, 3]`` -> LN_vision(ViT features) f32 ``[B, Nv, Dv]``."""
        out = self.vision(images, output_layer=self.config.feature_layer, apply_final_norm=False)
        return self.ln_vision(out.features.astype(jnp.float32))

    def image_embeds(self, feats, *, deterministic: bool = True):
        """ITC image side: ``feats [B, Nv, Dv]`` -> (normalised ``[B, Q, E]``, query outputs ``[B, Q, D]``)."""
        h, _ = self.qformer(feats, deterministic=deterministic)
        return l2_normalize(self.vision_proj(h)), h

    def text_embeds(self, tokens, text_valid, *, deterministic: bool = True):
        """ITC text side: ``tokens [B, T]`` ([CLS] first) -> normalised [CLS] projection ``[B, E]``."""
        h, _ = self.qformer(tokens=tokens, mask=masks_lib.padding_mask(text_valid), deterministic=deterministic)
        return l2_normalize(self.text_proj(h[:, 0]))

    def itm_logits(self, feats, tokens, text_valid, *, deterministic: bool = True):
        """ITM: bidirectional pass over ``[queries; text]`` -> f32 ``[B, 2]`` (mean over queries)."""
        q = self.config.qformer.num_queries
        mask = masks_lib.qformer_itm_mask(q, text_valid)
        h, _ = self.qformer(feats, tokens, mask=mask, deterministic=deterministic)
        return jnp.mean(self.itm_head(h[:, :q]).astype(jnp.float32), axis=1)

    def itg_pass(self, feats, tokens, text_valid, *, deterministic: bool = True):
        """ITG: multimodal-causal pass over ``[queries; [DEC] text]``.

        -> (text logits f32 ``[B, T, V]``, query outputs ``[B, Q, D]``). Under this mask the
        queries see only queries, so their outputs equal an image-only pass: the stage-1 loss
        reuses them for ITC (LAVIS reuses the same pass's cached keys/values for ITG).
        """
        q = self.config.qformer.num_queries
        mask = masks_lib.qformer_itg_mask(q, text_valid)
        h, _ = self.qformer(feats, tokens, mask=mask, deterministic=deterministic)
        return self.qformer.lm_logits(h[:, q:]), h[:, :q]

    def project_queries(self, query_out):
        """``[B, Q, D]`` query outputs -> normalised ITC image embeddings ``[B, Q, E]``."""
        return l2_normalize(self.vision_proj(query_out))

    def __call__(self, images, tokens, text_valid):
        """Init / smoke path touching every parameter: -> (ITC sims [B, B], ITM logits [B, 2], ITG logits
        or None when the Q-Former has no LM head, e.g. an imported HF retrieval checkpoint)."""
        feats = self.image_features(images)
        img, _ = self.image_embeds(feats)
        txt = self.text_embeds(tokens, text_valid)
        itm = self.itm_logits(feats, tokens, text_valid)
        itg = self.itg_pass(feats, tokens, text_valid)[0] if self.config.qformer.lm_head else None
        return itc_similarity(img, txt) / self.temp, itm, itg


def itc_similarity(image_embeds, text_embeds):
    """s(I_i, T_j) = max_q z_iq . z_j: ``[Bi, Q, E]``, ``[Bt, E]`` -> f32 ``[Bi, Bt]`` (no temperature)."""
    return jnp.max(jnp.einsum("iqe,te->itq", image_embeds.astype(jnp.float32),
                              text_embeds.astype(jnp.float32)), axis=-1)

