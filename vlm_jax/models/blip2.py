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



# ============================================================================== stage 2
# Extra letters: E the LM's word-embedding width (the soft prefix lives there), Tp prompt length,
# Tt text (target) length, Td decoder length, S = Q + Tp LM encoder length (T5).
#
#   soft prefix        p = W_lm QFormer(queries, f)           [B, Q, E]     ``language_projection``
#     (``prefix='vocab_mixture'``, a named deviation: p = softmax(W_v QFormer(queries, f)) @ E_words,
#      W_v [D, V], E_words [V, E] the frozen LM's word embeddings: each prefix vector a mixture of words)
#   decoder-only LM    logits = LM([p; embed(prompt); embed(text)])          OPT / GPT-2 (`DecoderLM`)
#                      loss on the text positions only: the prefix and the prompt are context
#   encoder-decoder    encoded = Enc([p; embed(prompt)]);  logits = Dec(text, encoded)       T5
#                      (the paper's prefix-LM split: prefix + prompt condition, text is generated)
#
# The image-only Q-Former pass is the same for both. Generation (`generate` below) prefills the
# prefix (+ prompt) once into the LM's KV cache and decodes through `vlm_jax.generate` /
# `vlm_jax.decoding` (greedy, beam with length penalty, sampling).

import jax  # noqa: E402

from vlm_jax.layers.decoder_lm import DecoderLM, DecoderLMConfig  # noqa: E402
from vlm_jax.layers.t5 import T5, T5Config  # noqa: E402


PREFIXES = ("linear", "vocab_mixture")


@dataclasses.dataclass(frozen=True)
class Blip2LMConfig:
    """Stage-2 model: frozen image encoder -> ``ln_vision`` -> Q-Former -> linear projection to the
    LM's word-embedding width -> soft prefix of a frozen LM.

    lm: `DecoderLMConfig` (OPT family, decoder-only) or `T5Config` (Flan-T5, encoder-decoder).
    qformer: the image-only Q-Former HF ships (``text_input=False, lm_head=False``) or a stage-1
      Q-Former (its text embeddings / text FFN / LM head exist as parameters, so a stage-1
      checkpoint restores into the same tree, but they are not used here).
    feature_layer / vision_norm_eps: as in `Blip2Config`.
    decoder_start_id: T5's first decoder token (its pad id, 0).
    prefix: 'linear' (the paper: ``language_projection [D, E]``) | 'vocab_mixture' (a deviation, for
      small LMs that read only word-like inputs: ``language_projection [D, V]``, softmax over the LM's
      vocabulary, then the mean of its word embeddings under that distribution; `PREFIXES`).
    """
    lm: DecoderLMConfig | T5Config
    qformer: QFormerConfig = QFormerConfig(text_input=False, lm_head=False)
    feature_layer: int = -1
    vision_norm_eps: float = 1e-6
    decoder_start_id: int = 0
    prefix: str = "linear"

    def __post_init__(self):
        if self.prefix not in PREFIXES:
            raise ValueError(f"Blip2LMConfig.prefix={self.prefix!r}; use one of {PREFIXES}.")
        if not isinstance(self.lm, (DecoderLMConfig, T5Config)):
            raise ValueError(f"Blip2LMConfig.lm must be a DecoderLMConfig (OPT) or a T5Config (Flan-T5); got "
                             f"{type(self.lm).__name__}.")

    @property
    def seq2seq(self) -> bool:
        """True for an encoder-decoder LM (T5)."""
        return isinstance(self.lm, T5Config)

    @property
    def prefix_width(self) -> int:
        """E: the width of the LM's input embeddings, which the query outputs are projected to."""
        return self.lm.width if self.seq2seq else self.lm.word_dim


def make_language_model(config: Blip2LMConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                        **kw) -> nn.Module:
    """The LM module of a `Blip2LMModel` (`DecoderLM` or `T5`), unbound: apply it to ``params['lm']``."""
    cls = T5 if config.seq2seq else DecoderLM
    return cls(config.lm, dtype=dtype, param_dtype=param_dtype, **kw)


def shift_right(text, text_mask, start_id: int):
    """Teacher-forcing decoder input of an encoder-decoder LM: ``text [B, T]`` (right padded,
    ``text_mask`` bool ``[B, T]``) -> (``[start; text[:, :-1]]`` ``[B, T]``, its mask ``[B, T]``:
    the start token is always real). Row j of the decoder then predicts ``text[:, j]``."""
    b = text.shape[0]
    dec_in = jnp.concatenate([jnp.full((b, 1), start_id, text.dtype), text[:, :-1]], axis=1)
    dec_mask = jnp.concatenate([jnp.ones((b, 1), bool), jnp.asarray(text_mask).astype(bool)[:, :-1]], axis=1)
    return dec_in, dec_mask


def _check_left_padded(mask, name: str):
    """Raise when a concrete ``mask [B, T]`` has padding in its last column (skipped under jit)."""
    if mask is None:
        return
    try:
        ok = bool(jnp.all(jnp.asarray(mask)[:, -1]))
    except jax.errors.ConcretizationTypeError:
        return
    if not ok:
        raise ValueError(f"{name}[:, -1] has padding: prompts must be LEFT padded (real tokens last), because the "
                         "first text token is predicted from the last prompt position.")


class Blip2LMModel(nn.Module):
    """Stage 2: image -> soft prefix of Q vectors -> frozen LM (decoder-only or encoder-decoder).

    Parameters: ``vision/...`` (image encoder, frozen), ``ln_vision`` (f32), ``qformer/...``
    (`QFormer`, incl. ``query_tokens``), ``language_projection [D, E]`` (+ bias), ``lm/...``
    (`DecoderLM` or `T5`, frozen). ``vision`` is called as in `Blip2QFormerModel`.

    Methods (``[B, S, S, 3]`` images everywhere):
      image_prefix(images) -> ``[B, Q, E]``
      lm_logits(images, tokens, mask, decoder_tokens=, decoder_mask=) -> full LM logits (parity
        with HF ``Blip2ForConditionalGeneration``: OPT ``[B, Q + T, V]``, T5 ``[B, Td, V]``)
      text_logits(images, prompt, prompt_mask, text, text_mask) -> (logits ``[B, Tt, V]``
        predicting ``text``, target mask bool ``[B, Tt]``) — the training view; the loss is
        cross-entropy of ``logits`` against ``text`` where the mask is True
    Generation: the module-level `generate` (greedy / beam / sample through `vlm_jax.generate`).
    """
    vision: nn.Module
    config: Blip2LMConfig
    dtype: Any = jnp.float32            # Q-Former / projection compute dtype
    param_dtype: Any = jnp.float32
    lm_dtype: Any = None                # LM compute dtype (None: ``dtype``)

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.ln_vision = LayerNorm(c.vision_norm_eps, name="ln_vision")            # f32 compute and params
        self.qformer = QFormer(c.qformer, name="qformer", **kw)
        width = c.prefix_width if c.prefix == "linear" else c.lm.vocab_size
        self.language_projection = Dense(width, ("embed", None), name="language_projection", **kw)
        self.lm = make_language_model(c, dtype=self.lm_dtype or self.dtype, param_dtype=self.param_dtype, name="lm")

    # ------------------------------------------------------------------ image -> prefix
    def image_features(self, images):
        """``images [B, S, S, 3]`` -> LN_vision(ViT features) f32 ``[B, Nv, Dv]``."""
        out = self.vision(images, output_layer=self.config.feature_layer, apply_final_norm=False)
        return self.ln_vision(out.features.astype(jnp.float32))

    def query_outputs(self, feats, *, deterministic: bool = True):
        """Image-only Q-Former pass: ``feats [B, Nv, Dv]`` -> ``[B, Q, D]``."""
        h, _ = self.qformer(feats, deterministic=deterministic)
        return h

    def image_prefix(self, images, *, deterministic: bool = True):
        """``images`` -> soft prefix ``[B, Q, E]`` in the LM's compute dtype."""
        h = self.query_outputs(self.image_features(images), deterministic=deterministic)
        if self.config.prefix == "vocab_mixture":                                     # [B, Q, V] -> [B, Q, E]
            weights = jax.nn.softmax(self.language_projection(h).astype(jnp.float32), axis=-1)
            return self.lm.embed_mixture(weights).astype(self.lm_dtype or self.dtype)
        return self.language_projection(h).astype(self.lm_dtype or self.dtype)

    def embed_inputs(self, prefix, tokens):
        """``[prefix [B, Q, E]; embed(tokens [B, T])]`` -> ``[B, Q + T, E]`` (the LM's input embeddings)."""
        check_tokens(tokens, "tokens")
        word = self.lm.embed_tokens(tokens)
        return jnp.concatenate([prefix.astype(word.dtype), word], axis=1)

    # ---------------------------------------------------------------------- the LM pass
    def lm_logits(self, images, tokens, mask=None, *, decoder_tokens=None, decoder_mask=None,
                  deterministic: bool = True):
        """Full LM logits with the image prefix in front of ``tokens``.

        ``tokens [B, T]`` / ``mask [B, T]`` (1 = real) are what follows HF's Q image placeholders in
        ``input_ids`` / ``attention_mask``. Decoder-only: -> f32 ``[B, Q + T, V]`` over
        ``[prefix; tokens]`` (row i predicts position i + 1). T5: the encoder reads
        ``[prefix; tokens]``, the decoder ``decoder_tokens [B, Td]`` (``decoder_mask``) -> f32
        ``[B, Td, V]``.
        """
        prefix = self.image_prefix(images, deterministic=deterministic)
        b, q = prefix.shape[0], prefix.shape[1]
        m = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask).astype(bool)
        full_mask = jnp.concatenate([jnp.ones((b, q), bool), m], axis=1)
        embeds = self.embed_inputs(prefix, tokens)
        if not self.config.seq2seq:
            if decoder_tokens is not None:
                raise ValueError("decoder_tokens are for an encoder-decoder LM; this Blip2LMModel has a decoder-only "
                                 "LM.")
            return self.lm(inputs_embeds=embeds, attention_mask=full_mask, deterministic=deterministic).logits
        if decoder_tokens is None:
            raise ValueError("Blip2LMModel.lm_logits with a T5 LM needs decoder_tokens [B, Td].")
        encoded, _ = self.lm.encode(inputs_embeds=embeds, attention_mask=full_mask, deterministic=deterministic)
        logits, _, _ = self.lm.run_decoder(decoder_tokens, encoded, encoder_mask=full_mask, decoder_mask=decoder_mask,
                                           deterministic=deterministic)
        return logits

    def text_logits(self, images, prompt, prompt_mask, text, text_mask, *, deterministic: bool = True):
        """Teacher-forced logits of the text given image and prompt -> (f32 ``[B, Tt, V]``, bool ``[B, Tt]``).

        Args:
          prompt: int ``[B, Tp]``, Tp >= 1 (``prompt_mask`` 1 = real). Decoder-only: LEFT padded,
            the LM's bos (OPT ``</s>``) then the prompt words (e.g. "Question: .. Short answer:");
            T5: the prompt words + eos as the T5 tokenizer writes them, padded on either side (an
            all-padding row is no prompt).
          text: int ``[B, Tt]`` RIGHT padded (``text_mask``): the tokens to learn, ending with eos.
        Returns ``(logits, target_mask)``: ``logits[:, j]`` predicts ``text[:, j]``; ``target_mask``
        = ``text_mask`` (True on real text tokens; never on the prefix, the prompt or padding).
        Decoder-only: one pass over ``[prefix; prompt; text]`` (padding in the middle is masked;
        position ids count real tokens), the prediction of ``text[:, j]`` read at position
        ``Q + Tp + j - 1``. T5: encoder ``[prefix; prompt]``, decoder ``[start; text[:, :-1]]``.
        """
        check_tokens(prompt, "prompt")
        check_tokens(text, "text")
        b, tp = prompt.shape
        tt = text.shape[1]
        pm = jnp.asarray(prompt_mask).astype(bool)
        tm = jnp.asarray(text_mask).astype(bool)
        if not self.config.seq2seq:
            _check_left_padded(pm, "prompt_mask")
            logits = self.lm_logits(images, jnp.concatenate([prompt, text], axis=1), jnp.concatenate([pm, tm], axis=1),
                                    deterministic=deterministic)
            q = logits.shape[1] - tp - tt
            return logits[:, q + tp - 1:q + tp + tt - 1], tm
        dec_in, dec_mask = shift_right(text, tm, self.config.decoder_start_id)
        logits = self.lm_logits(images, prompt, pm, decoder_tokens=dec_in, decoder_mask=dec_mask,
                                deterministic=deterministic)
        return logits, tm

    def __call__(self, images, tokens, mask=None, decoder_tokens=None):
        """Init / smoke path: `lm_logits` (T5: ``decoder_tokens`` default ``tokens``). At init it also
        creates a stage-1 Q-Former's text parameters (unused here) so a stage-1 checkpoint fits."""
        if self.config.seq2seq and decoder_tokens is None:
            decoder_tokens = tokens
        logits = self.lm_logits(images, tokens, mask, decoder_tokens=decoder_tokens)
        qc = self.config.qformer
        if self.is_initializing() and qc.text_input:
            h, _ = self.qformer(tokens=jnp.zeros((1, 1), jnp.int32))
            if qc.lm_head:
                self.qformer.lm_logits(h)
        return logits


def generate(model: Blip2LMModel, params, images, prompt, prompt_mask=None, *, max_new_tokens: int, eos_id: int,
             pad_id: int = 0, min_new_tokens: int = 0, strategy: str = "greedy", beam_size: int = 4,
             length_penalty: float = 0.0, rng=None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             use_image: bool = True):
    """Caption / answer images with a `Blip2LMModel` -> `vlm_jax.decoding.DecodeResult`
    (tokens ``[B, K, max_new_tokens]``: only new tokens, eos then ``pad_id``; K = 1 for greedy).

    ``prompt [B, Tp]`` / ``prompt_mask`` as for `Blip2LMModel.text_logits` (decoder-only: LEFT
    padded, at least the bos). The image prefix is computed once; decoder-only LMs prefill
    ``[prefix; prompt[:, :-1]]`` into the KV cache once (`vlm_jax.generate.prefill_decoder_lm`),
    T5 encodes ``[prefix; prompt]`` once and caches each decoder layer's cross-attention
    keys/values (`vlm_jax.generate.prefill_seq2seq`); beam search repeats that state per beam.
    ``strategy`` 'greedy' | 'beam' (``beam_size``, ``length_penalty``: score = sum log p /
    length**length_penalty) | 'sample' (``rng``, ``temperature``, ``top_k``, ``top_p``). Jittable
    with the keyword arguments static. ``use_image=False`` drops the image prefix: the same frozen LM
    answers from the prompt alone (the question-only / blind baseline; ``images`` only give B).
    """
    from vlm_jax import generate as gen  # the decoding level; imported where used (models stay below it)

    c = model.config
    variables = {"params": params}
    prefix = model.apply(variables, images, method=Blip2LMModel.image_prefix)
    if not use_image:
        prefix = prefix[:, :0]                                            # [B, 0, E]
    lm = make_language_model(c, dtype=model.lm_dtype or model.dtype, param_dtype=model.param_dtype)
    b = prompt.shape[0]
    pm = jnp.ones(prompt.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask).astype(bool)
    common = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, min_new_tokens=min_new_tokens,
                  strategy=strategy, beam_size=beam_size, length_penalty=length_penalty, rng=rng,
                  temperature=temperature, top_k=top_k, top_p=top_p)
    if not c.seq2seq:
        return gen.generate(lm, params["lm"], prompt, prompt_mask=pm, prefix_embeds=prefix if use_image else None,
                            **common)
    embeds = model.apply(variables, prefix, prompt, method=Blip2LMModel.embed_inputs)
    mask = jnp.concatenate([jnp.ones((b, prefix.shape[1]), bool), pm], axis=1)
    return gen.generate_seq2seq(lm, params["lm"], inputs_embeds=embeds, input_mask=mask,
                                decoder_start_id=c.decoder_start_id, **common)


__all__ += ["Blip2LMConfig", "Blip2LMModel", "make_language_model", "generate", "shift_right"]
