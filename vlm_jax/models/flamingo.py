"""Flamingo (Alayrac et al. 2022): the Perceiver Resampler and the tanh-gated cross-attention
block (GATED XATTN-DENSE) that lets a frozen decoder LM read images interleaved with text.

Dimension letters: B batch, M media (images) per example, F frames per media (1 for a still
image), P patches (vision tokens) per frame, D resampler width (= the vision feature width),
R latents per media (the paper's 64), T text length, Dt text (LM) width, Dm media width seen by
the cross-attention (= D), H heads, K head dim, Fh FFN hidden width.

The mechanism, in the paper's terms (sections 2.1-2.3; figure 4's pseudo-code names the gates):

  Perceiver Resampler  (one media at a time; `PerceiverResampler`)
    X_f  = vision features of every frame + learned time embedding e_t   [B, M, F, P, D]
         -> flattened per media to one key/value set                      [B*M, F*P, D]
    X    = learned latents (shared by every media)                        [R, D]
    per layer:  X = X + Attn(q = LN(X), kv = [LN(X_f); LN(X)])           (latents also attend
                                                                          to themselves)
                X = X + FFW(LN(X))
    out  = LN(X)                                                          [B, M, R, D]

  GATED XATTN-DENSE  (inserted before LM layers; `GatedCrossAttentionBlock`)
    y = x + tanh(alpha_xattn) * XAttn(q = LN(x), kv = media latents, media mask)
    y = y + tanh(alpha_dense) * FFW(LN(y))                                [B, T, Dt]
    alpha_xattn = alpha_dense = 0 at init, so the LM starts exactly as it was frozen.

  Which image a token sees  (`flamingo_media_mask` in `vlm_jax.layers.masks`)
    text_time[t] = number of <image> markers at or before t (`media_text_time`);
    token t attends only to the R latents of media ``text_time[t] - 1`` (the most recent
    preceding image); tokens before the first image (text_time 0) have an empty mask row and
    get a zero cross-attention output (``MultiHeadAttention(zero_empty_rows=True)``). The
    gated FFW still runs on every token (it is ``dense`` in the paper's pseudo-code).

Placement in the LM is declarative: ``DecoderLMConfig(insert=gated_xattn_insert(cfg, every=N))``
puts the block before every N-th layer of the one `TransformerStack` (paper: every layer for
Flamingo-3B, every 4th for 9B, every 7th for 80B), called with
``inserted_inputs = cross_attention_inputs(latents, text_time, media_valid)``.

The whole model (`FlamingoConfig`, `Flamingo`; its own legend further down): frozen ViT ->
(``media_proj`` when widths differ) -> resampler -> the frozen LM read through ``inputs_embeds``,
with ``<image>`` / ``<|endofchunk|>`` rows in a separate trainable ``extra_embed`` table (ids >= V)
and logits over V + X. `interleaved_loss_mask` is open_flamingo's interleaved loss masking;
`param_groups` freezes ``vision/..`` and ``lm/..`` except the inserted blocks.

Compared with flamingo-pytorch 0.1.2 (the test oracle): its ``PerceiverResampler`` treats its
"time" axis as independent media slices (time embedding i is added to slice i; each slice gets
its own latents), so one frame per image (F = 1) fed as separate batch rows equals this module;
its FFN is GELU (``activation='gelu'`` here) and it has no biases, like this module.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vlm_jax.layers import masks as masks_lib
from vlm_jax.layers.attention import IMPLEMENTATIONS, MultiHeadAttention
from vlm_jax.layers.mlp import ACTIVATIONS, MLP
from vlm_jax.layers.norms import NORM_TYPES, LayerNorm, make_norm
from vlm_jax.layers.transformer import ACT_AXES, InsertSpec

__all__ = ["PerceiverResamplerConfig", "PerceiverResampler", "PerceiverLayer", "GatedXAttnConfig",
           "GatedCrossAttentionBlock", "gated_xattn_insert", "media_text_time", "cross_attention_inputs",
           "PAPER_XATTN_EVERY", "GATE_TYPES"]

# Flamingo's GATED XATTN-DENSE frequency (insert every N LM layers), by model size (the paper's
# architecture hyper-parameter table in the appendix).
PAPER_XATTN_EVERY = {"3b": 1, "9b": 4, "80b": 7}


def _check_common(cls_name: str, c, mlp_dim: int) -> None:
    for f, v in (("num_heads", c.num_heads), ("head_dim", c.head_dim), ("mlp_dim", mlp_dim)):
        if v <= 0:
            raise ValueError(f"{cls_name}.{f} must be positive; got {v}.")
    if c.activation not in ACTIVATIONS:
        raise ValueError(f"{cls_name}.activation={c.activation!r}; use one of {ACTIVATIONS}.")
    if c.implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{cls_name}.implementation={c.implementation!r}; use one of {IMPLEMENTATIONS}.")


GATE_TYPES = ("scalar", "vector")


# ---------------------------------------------------------------------- Perceiver Resampler
@dataclasses.dataclass(frozen=True)
class PerceiverResamplerConfig:
    """The Perceiver Resampler's shape.

    width: D, the vision feature width (the latents and all residual streams have it too).
    depth: number of layers. num_heads, head_dim: H, K (H*K may differ from D).
    num_latents: R, learned latents = output tokens per media.
    mlp_dim: Fh, FFN hidden width (flamingo-pytorch's ``int(dim * ff_mult)``); None -> 4 D
      (`ffn_dim` resolves it).
    activation: FFN activation: 'squared_relu' (the paper) | 'gelu' (flamingo-pytorch,
      open_flamingo) | any `vlm_jax.layers.mlp.ACTIVATIONS`.
    max_frames: rows of the learned time-embedding table (frames per media, F <= this;
      flamingo-pytorch's ``num_media_embeds``).
    norm_eps: LayerNorm epsilon. implementation: attention kernel (None | 'xla' | 'cudnn').
    qk_norm: a LayerNorm (scale + bias, ``norm_eps``) on every head's queries and keys
      (IDEFICS ``qk_layer_norms_perceiver``; `MultiHeadAttention(qk_norm=...)`).
    """
    width: int
    depth: int = 6
    num_heads: int = 8
    head_dim: int = 64
    num_latents: int = 64
    mlp_dim: int | None = None
    activation: str = "squared_relu"
    max_frames: int = 8
    norm_eps: float = 1e-5
    implementation: str | None = None
    qk_norm: bool = False

    def __post_init__(self):
        for f in ("width", "depth", "num_latents", "max_frames"):
            if getattr(self, f) <= 0:
                raise ValueError(f"PerceiverResamplerConfig.{f} must be positive; got {getattr(self, f)}.")
        _check_common("PerceiverResamplerConfig", self, mlp_dim=self.ffn_dim)

    @property
    def ffn_dim(self) -> int:
        """Fh: ``mlp_dim``, or 4 D when it is None."""
        return 4 * self.width if self.mlp_dim is None else self.mlp_dim

    @classmethod
    def paper(cls, **kw) -> "PerceiverResamplerConfig":
        """The paper's resampler (all sizes): 6 layers, width 1536, 16 heads, 64 latents,
        Squared-ReLU. The paper gives D and H only: K = D / H = 96 and Fh = 4 D are assumptions."""
        return cls(**{**dict(width=1536, depth=6, num_heads=16, head_dim=96, num_latents=64,
                             activation="squared_relu"), **kw})


class PerceiverLayer(nn.Module):
    """One resampler layer: ``media [N, S, D]`` (N = B*M, S = F*P), ``latents [N, R, D]`` ->
    ``latents [N, R, D]``.

    Parameters: ``media_norm``, ``latents_norm`` (LayerNorms), ``attn`` (`MultiHeadAttention`,
    no biases: ``query/key/value [D, H, K]``, ``out [H, K, D]``), ``mlp_norm``, ``mlp``
    (``wi [D, Fh]``, ``wo [Fh, D]``, no biases).
    """
    config: PerceiverResamplerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, media, latents, *, deterministic: bool = True):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(c.norm_eps, name="latents_norm", **kw)(latents)
        kv = jnp.concatenate([LayerNorm(c.norm_eps, name="media_norm", **kw)(media), h], axis=1)   # [N, S+R, D]
        attn = MultiHeadAttention(num_heads=c.num_heads, head_dim=c.head_dim, use_bias=False, out_bias=False,
                                  implementation=c.implementation, qk_norm="layernorm" if c.qk_norm else None,
                                  qk_norm_eps=c.norm_eps, name="attn", **kw)
        latents = latents + attn(h, kv, deterministic=deterministic)
        mlp = MLP(hidden_dim=c.ffn_dim, activation=c.activation, use_bias=False, name="mlp", **kw)
        latents = latents + mlp(LayerNorm(c.norm_eps, name="mlp_norm", **kw)(latents), deterministic=deterministic)
        return nn.with_logical_constraint(latents, ACT_AXES)


class PerceiverResampler(nn.Module):
    """Vision features of M media -> R latents per media.

    ``media [B, M, F, P, D]`` (or ``[B, M, P, D]`` for still images, F = 1) -> ``[B, M, R, D]``.
    Each media is resampled on its own: its F*P frame-patch features (plus time embeddings)
    form one key/value set together with the latents.

    Parameters: ``latents [R, D]`` ('latents', 'embed'), ``time_embed [max_frames, D]``
    ('positions', 'embed'), ``layers_i/...`` (`PerceiverLayer`), ``final_norm``. The latents
    and time embeddings start as N(0, 1), as in flamingo-pytorch and open_flamingo.
    """
    config: PerceiverResamplerConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, media, *, deterministic: bool = True):
        c = self.config
        if media.ndim == 4:
            media = media[:, :, None]
        if media.ndim != 5:
            raise ValueError(f"PerceiverResampler: media must be [B, M, F, P, D] (or [B, M, P, D] for still images); "
                             f"got shape {media.shape}.")
        b, m, f, p, d = media.shape
        if d != c.width:
            raise ValueError(f"PerceiverResampler: media width {d} != PerceiverResamplerConfig.width={c.width} "
                             "(project the vision features to the resampler width first).")
        if f > c.max_frames:
            raise ValueError(f"PerceiverResampler: {f} frames per media exceed PerceiverResamplerConfig.max_frames="
                             f"{c.max_frames} (the time-embedding table); raise max_frames or subsample frames.")
        latents = self.param("latents", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                     ("latents", "embed")),
                             (c.num_latents, c.width), self.param_dtype)
        time_embed = self.param("time_embed", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                           ("positions", "embed")),
                                (c.max_frames, c.width), self.param_dtype)
        x = media.astype(self.dtype) + jnp.asarray(time_embed[:f], self.dtype)[None, None, :, None, :]
        x = nn.with_logical_constraint(x.reshape(b * m, f * p, d), ACT_AXES)                 # [B*M, F*P, D]
        h = jnp.broadcast_to(jnp.asarray(latents, self.dtype), (b * m, c.num_latents, d))  # [B*M, R, D]
        for i in range(c.depth):
            h = PerceiverLayer(c, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}")(
                x, h, deterministic=deterministic)
        h = LayerNorm(c.norm_eps, name="final_norm", dtype=self.dtype, param_dtype=self.param_dtype)(h)
        return h.reshape(b, m, c.num_latents, d)


# ------------------------------------------------------------------------ GATED XATTN-DENSE
@dataclasses.dataclass(frozen=True)
class GatedXAttnConfig:
    """One GATED XATTN-DENSE block (the text width Dt and media width Dm come from the inputs).

    num_heads, head_dim: H, K of the cross-attention. mlp_dim: Fh of the gated FFW.
    activation: 'squared_relu' (the paper) | 'gelu' (flamingo-pytorch, open_flamingo) | a gated
      one (IDEFICS' LLaMA MLP: 'gated_silu'). norm_type / norm_eps: the two pre-norms
      ('layernorm' | 'rmsnorm'). use_bias: biases of the attention and FFW dense layers (none in
      the paper's reproductions). implementation: attention kernel (None | 'xla' | 'cudnn').
    qk_norm: a ``norm_type`` norm (``norm_eps``) on every head's queries and keys (IDEFICS
      ``qk_layer_norms``: RMSNorm; `MultiHeadAttention(qk_norm=...)`).
    gate: 'scalar' (the paper: one ``alpha`` per gate) | 'vector' (IDEFICS ``alpha_type='vector'``:
      one ``alpha [Dt]`` per channel).
    """
    num_heads: int
    head_dim: int
    mlp_dim: int
    activation: str = "squared_relu"
    norm_type: str = "layernorm"
    norm_eps: float = 1e-5
    use_bias: bool = False
    implementation: str | None = None
    qk_norm: bool = False
    gate: str = "scalar"

    def __post_init__(self):
        _check_common("GatedXAttnConfig", self, self.mlp_dim)
        if self.norm_type not in NORM_TYPES:
            raise ValueError(f"GatedXAttnConfig.norm_type={self.norm_type!r}; use one of {NORM_TYPES}.")
        if self.gate not in GATE_TYPES:
            raise ValueError(f"GatedXAttnConfig.gate={self.gate!r}; use one of {GATE_TYPES}.")

    @classmethod
    def paper(cls, size: str = "3b", **kw) -> "GatedXAttnConfig":
        """The paper's blocks: '3b' (D 2048, 16 heads), '9b' (4096, 32), '80b' (8192, 64), Squared-ReLU;
        insert them every `PAPER_XATTN_EVERY[size]` layers. K = D / H and Fh = 4 D are assumptions
        (the paper lists D and H)."""
        shapes = {"3b": (2048, 16), "9b": (4096, 32), "80b": (8192, 64)}
        if size not in shapes:
            raise ValueError(f"GatedXAttnConfig.paper(size={size!r}); choose one of {sorted(shapes)}.")
        d, h = shapes[size]
        return cls(**{**dict(num_heads=h, head_dim=d // h, mlp_dim=4 * d, activation="squared_relu"), **kw})


class GatedCrossAttentionBlock(nn.Module):
    """GATED XATTN-DENSE: ``x [B, T, Dt]``, ``media [B, M*R, Dm]``, ``media_mask [B|1, 1, T, M*R]``
    -> ``[B, T, Dt]``.

      y = x + tanh(alpha_xattn) * XAttn(LN(x), media, media_mask)    (empty mask rows -> 0)
      y = y + tanh(alpha_dense) * FFW(LN(y))

    Parameters: ``cross_norm``, ``cross_attn`` (`MultiHeadAttention`: ``query [Dt, H, K]``,
    ``key/value [Dm, H, K]``, ``out [H, K, Dt]``), ``mlp_norm``, ``mlp`` (``wi [Dt, Fh]``,
    ``wo [Fh, Dt]``), ``alpha_xattn`` and ``alpha_dense`` (scalars; ``[Dt]`` with ``gate='vector'``;
    0 at init). With ``qk_norm`` the cross-attention also has
    ``query_norm`` / ``key_norm`` (`MultiHeadAttention(qk_norm=...)`).

    Built by `TransformerStack` from ``InsertSpec(module=GatedCrossAttentionBlock,
    kwargs={'config': cfg}, pass_decode=True, ...)`` (`gated_xattn_insert`); ``media_mask`` None
    lets every token see every media latent.

    Decoding (``decode=True``): a call with ``media`` projects the media keys/values and stores
    them in the 'cache' collection (``cross_attn/cached_cross_key|value [B, M*R, H, K]``, as
    `MultiHeadAttention` does for T5's encoder); a call with ``media=None`` reads them back, so
    a generation loop projects each image's latents once (at `init_cache` / the prefill), not at
    every new token. Only the mask (which image each new token sees) is needed per step. With
    ``media_offset`` o (slots, i.e. media index x R) the call's ``media [B, Mn*R, Dm]`` is written
    at slots o.. of the cache made for all M*R slots and ``media_mask`` covers all of them: a
    dialogue adds each new image's keys/values without re-projecting the earlier ones.
    """
    config: GatedXAttnConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, media, media_mask=None, media_offset=None, *, deterministic: bool = True,
                 decode: bool = False):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        from_cache = media is None
        if from_cache and not decode:
            raise ValueError("GatedCrossAttentionBlock: media=None reads the cached media keys/values, which needs "
                             "decode=True after a decode call that passed the media (init_cache / the prefill).")
        if x.ndim != 3 or (not from_cache and (media.ndim != 3 or media.shape[0] != x.shape[0])):
            raise ValueError(f"GatedCrossAttentionBlock: x must be [B, T, Dt] and media [B, M*R, Dm] with the same B; "
                             f"got {x.shape} and {None if from_cache else media.shape} (flatten resampler latents "
                             "[B, M, R, D] with "
                             "cross_attention_inputs).")
        shape, axes = ((), ()) if c.gate == "scalar" else ((x.shape[-1],), ("norm",))
        gate = lambda name: jnp.tanh(self.param(  # noqa: E731
            name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape,
            self.param_dtype)).astype(self.dtype)
        x = nn.with_logical_constraint(x.astype(self.dtype), ACT_AXES)
        attn = MultiHeadAttention(num_heads=c.num_heads, head_dim=c.head_dim, use_bias=c.use_bias,
                                  out_bias=c.use_bias, implementation=c.implementation, zero_empty_rows=True,
                                  qk_norm=c.norm_type if c.qk_norm else None, qk_norm_eps=c.norm_eps,
                                  name="cross_attn", **kw)
        h = make_norm(c.norm_type, c.norm_eps, name="cross_norm", **kw)(x)
        kv = None if from_cache else media.astype(self.dtype)
        if media_offset is not None and (from_cache or not decode):
            raise ValueError("GatedCrossAttentionBlock: media_offset writes new media keys/values into the cache and "
                             "needs decode=True with media.")
        y = x + gate("alpha_xattn") * attn(h, kv, mask=media_mask, deterministic=deterministic, decode=decode,
                                           kv_from_cache=from_cache, cross_cache_offset=media_offset)
        mlp = MLP(hidden_dim=c.mlp_dim, activation=c.activation, use_bias=c.use_bias, name="mlp", **kw)
        y = y + gate("alpha_dense") * mlp(make_norm(c.norm_type, c.norm_eps, name="mlp_norm", **kw)(y),
                                          deterministic=deterministic)
        return nn.with_logical_constraint(y, ACT_AXES)


def gated_xattn_insert(config: GatedXAttnConfig, every: int, offset: int | None = None) -> InsertSpec:
    """The `InsertSpec` that puts a `GatedCrossAttentionBlock` before every ``every``-th LM layer.
    ``offset`` None -> ``every - 1`` (open_flamingo's layout: before layers N-1, 2N-1, ..);
    IDEFICS uses 0."""
    return InsertSpec(module=GatedCrossAttentionBlock, kwargs={"config": config}, every=every,
                      offset=every - 1 if offset is None else offset, pass_decode=True)


# ------------------------------------------------------------------------------ media inputs
def media_text_time(is_media_marker):
    """``is_media_marker`` bool ``[B, T]`` (True at each ``<image>`` token) -> int32 ``[B, T]``:
    the 1-based index of the most recent media at or before each token, 0 before the first."""
    marker = jnp.asarray(is_media_marker)
    if marker.ndim != 2:
        raise ValueError(f"is_media_marker must be [B, T]; got shape {marker.shape}.")
    return jnp.cumsum(marker.astype(jnp.int32), axis=1)


def cross_attention_inputs(latents, text_time, media_valid=None):
    """The ``inserted_inputs`` of the gated blocks.

    latents: resampler output ``[B, M, R, D]``; text_time: int ``[B, T]`` (`media_text_time`);
    media_valid: bool ``[B, M]`` (which media slots hold a real image; default all).
    Returns ``(media [B, M*R, D], media_mask [B, 1, T, M*R])``.
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be the resampler output [B, M, R, D]; got shape {latents.shape}.")
    b, m, r, d = latents.shape
    if media_valid is None:
        media_valid = jnp.ones((b, m), bool)
    mask = masks_lib.flamingo_media_mask(text_time, media_valid, r)
    return latents.reshape(b, m * r, d), mask


# ============================================================================== the model
# Extra letters: S image side, C channels, Dv vision width, Pv vision tokens per frame (P + [CLS]),
# V the frozen LM's vocabulary, X added tokens (``<image>``, ``<|endofchunk|>``), E the LM's
# word-embedding width (= Dt except OPT-350m).
#
#   images  [B, M, S, S, C] | [B, M, F, S, S, C]
#     -> frozen ViT, one frame at a time, features of ``feature_layer``   [B*M*F, Pv, Dv]
#        (``vision_tokens='patches'`` drops [CLS], as open_flamingo)       [B, M, F, P, Dv]
#     -> ``media_proj`` [Dv, D] only when Dv != the resampler width D (trainable; the paper and
#        open_flamingo run the resampler at the vision width, so they have none)
#     -> PerceiverResampler                                                [B, M, R, D]
#   tokens  [B, T]: id < V -> the frozen LM table ``lm/token_embed`` [V, E];
#                   id >= V -> the trainable ``extra_embed`` [X, E] row ``id - V``
#     -> inputs_embeds [B, T, E] -> DecoderLM (+ GATED XATTN-DENSE before every N-th layer,
#        reading (media [B, M*R, D], media_mask [B, 1, T, M*R]) from ``cross_attention_inputs``)
#   logits [B, T, V + X] = [frozen LM head | extra output rows]: the extra rows are ``extra_embed``
#     itself when the LM ties its head (open_flamingo resizes a tied table, IDEFICS ties its
#     ``additional_fc`` to ``additional_embedding``), else their own ``extra_lm_head [E, X]``.

import jax  # noqa: E402

from vlm_jax.layers.decoder_lm import DecoderLM, DecoderLMConfig  # noqa: E402
from vlm_jax.layers.mlp import Dense  # noqa: E402
from vlm_jax.layers.text_common import TextOutput, check_tokens, embed_table  # noqa: E402
from vlm_jax.layers.vit import ViTConfig, VisionTransformer  # noqa: E402

__all__ += ["FlamingoConfig", "Flamingo", "MediaCounter", "interleaved_label_mask", "interleaved_loss_mask",
            "param_groups",
            "FROZEN_VISION_PATTERN", "FROZEN_LM_PATTERN", "VISION_TOKENS"]

VISION_TOKENS = ("patches", "all")


@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
    """Frozen ViT -> Perceiver Resampler -> frozen decoder LM with GATED XATTN-DENSE blocks.

    vision: the frozen image encoder (`ViTConfig`; a CLIP preset for open_flamingo / IDEFICS).
    feature_layer: which hidden state of the ViT feeds the resampler (`VisionTransformer`'s
      ``output_layer``: -1 the last layer as HF's last_hidden_state, -2 the penultimate raw one).
    vision_tokens: 'patches' drops [CLS] (open_flamingo: open_clip's patch tokens) | 'all'
      (IDEFICS: CLIP's whole last_hidden_state).
    resampler: `PerceiverResamplerConfig`; a trainable ``media_proj`` maps Dv -> its width when
      they differ.
    lm: the frozen LM as pretrained (``insert`` None: Flamingo adds the blocks itself).
    xattn: the GATED XATTN-DENSE blocks; inserted before every ``xattn_every``-th LM layer, at
      ``xattn_offset`` (None -> every - 1, open_flamingo's layout; IDEFICS 0).
    num_extra_tokens: X rows of the trainable ``extra_embed`` table (ids V .. V+X-1).
    image_token_id / eoc_token_id: ``<image>`` and ``<|endofchunk|>``; None -> V and V + 1.
    tie_extra_embeddings: the extra output rows are ``extra_embed`` (True) or a separate
      ``extra_lm_head`` (False); None follows ``lm.tie_embeddings``.
    """
    vision: ViTConfig
    resampler: PerceiverResamplerConfig
    lm: DecoderLMConfig
    xattn: GatedXAttnConfig
    xattn_every: int = 1
    xattn_offset: int | None = None
    feature_layer: int = -1
    vision_tokens: str = "patches"
    num_extra_tokens: int = 2
    image_token_id: int | None = None
    eoc_token_id: int | None = None
    tie_extra_embeddings: bool | None = None

    def __post_init__(self):
        for f, t in (("vision", ViTConfig), ("resampler", PerceiverResamplerConfig), ("lm", DecoderLMConfig),
                     ("xattn", GatedXAttnConfig)):
            if not isinstance(getattr(self, f), t):
                raise ValueError(f"FlamingoConfig.{f} must be a {t.__name__}; got {type(getattr(self, f)).__name__}.")
        if self.lm.insert is not None:
            raise ValueError("FlamingoConfig.lm.insert must be None: Flamingo inserts its gated cross-attention "
                             "blocks itself (set xattn / xattn_every / xattn_offset instead).")
        if self.vision_tokens not in VISION_TOKENS:
            raise ValueError(f"FlamingoConfig.vision_tokens={self.vision_tokens!r}; use one of {VISION_TOKENS}.")
        if self.num_extra_tokens < 0:
            raise ValueError(f"FlamingoConfig.num_extra_tokens must be >= 0; got {self.num_extra_tokens}.")
        _ = self.lm_config                     # validates xattn_every / offset (InsertSpec, DecoderLMConfig)
        total = self.total_vocab
        for f in ("image_id", "eoc_id"):
            if not 0 <= getattr(self, f) < total:
                raise ValueError(f"FlamingoConfig: {f}={getattr(self, f)} is outside the vocabulary [0, {total}) "
                                 f"(LM vocab {self.lm.vocab_size} + num_extra_tokens {self.num_extra_tokens}).")
        if self.image_id == self.eoc_id:
            raise ValueError(f"FlamingoConfig: image_token_id and eoc_token_id are both {self.image_id}.")

    @property
    def total_vocab(self) -> int:
        """V + X: the width of the logits."""
        return self.lm.vocab_size + self.num_extra_tokens

    @property
    def image_id(self) -> int:
        return self.lm.vocab_size if self.image_token_id is None else self.image_token_id

    @property
    def eoc_id(self) -> int:
        return self.lm.vocab_size + 1 if self.eoc_token_id is None else self.eoc_token_id

    @property
    def tied_extra(self) -> bool:
        return self.lm.tie_embeddings if self.tie_extra_embeddings is None else self.tie_extra_embeddings

    @property
    def needs_media_proj(self) -> bool:
        return self.vision.hidden_size != self.resampler.width

    @property
    def lm_config(self) -> DecoderLMConfig:
        """The LM with the gated blocks declared (``insert``)."""
        return dataclasses.replace(self.lm, insert=gated_xattn_insert(self.xattn, self.xattn_every,
                                                                      self.xattn_offset))


class MediaCounter(nn.Module):
    """Decode-time count of the ``<image>`` markers already written to the KV cache.

    ``is_marker bool [B, T]`` (this call's new tokens) -> ``i32 [B]``, the markers seen by the
    earlier calls. The count lives in the 'cache' collection as ``count i32[B]`` (leading dim B,
    so beam search reorders it with the keys/values). Like the attention layers' cache, the first
    call (the one `init_cache` makes, when the variable does not exist yet) only creates it at 0;
    every later call adds its markers."""

    @nn.compact
    def __call__(self, is_marker):
        b = is_marker.shape[0]
        initialized = self.has_variable("cache", "count")
        count = self.variable("cache", "count", lambda: jnp.zeros((b,), jnp.int32))
        seen = count.value
        if seen.shape != (b,):
            raise ValueError(f"Flamingo: the cache's media count holds batch {seen.shape} but the input has batch "
                             f"{b}; re-create the cache (init_cache) for this batch.")
        if initialized:
            count.value = seen + jnp.sum(is_marker.astype(jnp.int32), axis=1)
        return seen


class Flamingo(nn.Module):
    """Interleaved images and text -> next-token logits ``[B, T, V + X]``.

    Parameters (the optimizer groups of `param_groups` freeze the first and fourth lines):
      ``vision/...``             `VisionTransformer` (frozen)
      ``media_proj/kernel``      ``[Dv, D]`` (+ bias), only when Dv != D (trainable)
      ``resampler/...``          `PerceiverResampler` (trainable)
      ``lm/...``                 `DecoderLM`: token_embed [V, E], position_embed, layers_i, final_norm,
                                 [lm_head] (frozen) ...
      ``lm/inserted_m/...``      ... except the GATED XATTN-DENSE blocks (trainable; scanned LM:
                                 ``lm/layers/inserted_m``)
      ``extra_embed/embedding``  ``[X, E]`` the added tokens' rows (trainable)
      ``extra_lm_head/kernel``   ``[E, X]`` their output rows, untied LMs only (trainable)
    """
    config: FlamingoConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision = VisionTransformer(c.vision, name="vision", **kw)
        if c.needs_media_proj:
            self.media_proj = Dense(c.resampler.width, (None, "embed"), name="media_proj", **kw)
        self.resampler = PerceiverResampler(c.resampler, name="resampler", **kw)
        self.lm = DecoderLM(c.lm_config, name="lm", **kw)
        self.media_count = MediaCounter(name="media_count")
        if c.num_extra_tokens:
            self.extra_embed = embed_table(c.num_extra_tokens, c.lm.word_dim, (None, "embed"), name="extra_embed",
                                           **kw)
            if not c.tied_extra:
                self.extra_lm_head = Dense(c.num_extra_tokens, ("embed", None), use_bias=False,
                                           name="extra_lm_head", **kw)

    # ----------------------------------------------------------------------- the pieces
    def encode_images(self, images, *, deterministic: bool = True):
        """``images [B, M, S, S, C]`` (or ``[B, M, F, S, S, C]``) -> resampler latents ``[B, M, R, D]``."""
        c = self.config
        if images.ndim == 5:
            images = images[:, :, None]
        if images.ndim != 6:
            raise ValueError(f"Flamingo: images must be [B, M, S, S, C] or [B, M, F, S, S, C]; got {images.shape}.")
        b, m, f = images.shape[:3]
        out = self.vision(images.reshape((b * m * f,) + images.shape[3:]), output_layer=c.feature_layer,
                          deterministic=deterministic)
        feats = out.features[:, 1:] if c.vision_tokens == "patches" else out.features      # [B*M*F, P, Dv]
        feats = feats.reshape((b, m, f) + feats.shape[1:])                                  # [B, M, F, P, Dv]
        if c.needs_media_proj:
            feats = self.media_proj(feats)
        return self.resampler(feats, deterministic=deterministic)

    def embed_tokens(self, tokens):
        """``tokens [B, T]`` -> ``[B, T, E]``: the frozen LM table for ids < V, ``extra_embed`` above."""
        c = self.config
        check_tokens(tokens, "tokens")
        v = c.lm.vocab_size
        x = self.lm.embed_tokens(jnp.clip(tokens, 0, v - 1))
        if not c.num_extra_tokens:
            return x
        extra = self.extra_embed(jnp.clip(tokens - v, 0, c.num_extra_tokens - 1))
        return jnp.where((tokens >= v)[..., None], extra, x)

    def logits_from_hidden(self, hidden):
        """LM-head input ``[B, T, E]`` -> f32 logits over the extended vocabulary ``[B, T, V + X]``
        (the frozen LM head's V columns, then the X extra ones)."""
        c = self.config
        logits = self.lm.logits_from_hidden(hidden)
        if not c.num_extra_tokens:
            return logits
        extra = self.extra_embed.attend(hidden) if c.tied_extra else self.extra_lm_head(hidden)
        return jnp.concatenate([logits, extra.astype(jnp.float32)], axis=-1)

    def __call__(self, tokens, images=None, *, attention_mask=None, media_valid=None, latents=None, text_time=None,
                 position_ids=None, deterministic: bool = True, decode: bool = False, key_valid=None,
                 media_offset=None) -> TextOutput:
        """Args:
          tokens: int ``[B, T]`` interleaved text with ``<image>`` markers (and ``<|endofchunk|>``).
          images: ``[B, M, S, S, C]`` / ``[B, M, F, S, S, C]``: image m belongs to the (m+1)-th marker.
          attention_mask: ``[B, T]`` 1 = real token (`DecoderLM`).
          media_valid: bool ``[B, M]`` which media slots hold an image (default all).
          latents: ``[B, M, R, D]`` precomputed `encode_images` output instead of ``images`` (decoding).
            With neither, no token sees an image (the cross-attention output is 0 everywhere) --
            except while decoding with ``media_valid`` given: then the gated blocks read the media
            keys/values an earlier decode call stored from its latents (`init_cache` with
            ``latents``, or the prefill: `vlm_jax.generate`'s ``prefill_inputs``), so each image is
            projected once per generation, not once per new token.
          text_time: int ``[B, T]`` override of ``media_text_time(tokens == image_id)``. While decoding
            (``decode=True``) the default counts the markers already in the KV cache too: the cache
            holds ``media_count/count i32[B]`` (`MediaCounter`), advanced by every decode call
            after the one that creates the cache (`vlm_jax.layers.attention.init_cache`); an
            explicit ``text_time`` wins (the counter still advances).
          media_offset: int (or i32 scalar), decoding only, with ``images`` / ``latents`` of Mn new
            media and ``media_valid [B, M]`` for all M slots of the cache: the new media are slots
            media_offset .. media_offset+Mn-1; only their keys/values are projected and written
            (the others stay cached), and the new tokens see every valid slot
            (`vlm_jax.tasks.flamingo.Dialogue`).
          position_ids, decode, key_valid: as `DecoderLM`.
        Returns `TextOutput`: ``logits`` f32 ``[B, T, V + X]``, ``hidden [B, T, E]``.
        """
        c = self.config
        from_cache = decode and latents is None and images is None and media_valid is not None
        if latents is None and not from_cache:
            if images is not None:
                latents = self.encode_images(images, deterministic=deterministic)
            else:
                latents = jnp.zeros((tokens.shape[0], 1, c.resampler.num_latents, c.resampler.width), self.dtype)
                media_valid = jnp.zeros((tokens.shape[0], 1), bool)
        elif images is not None:
            raise ValueError("Flamingo: pass images or latents, not both.")
        if decode:
            # markers already in the KV cache: a per-row counter in the 'cache' collection
            count = self.media_count(tokens == c.image_id)                                  # i32[B]
            if text_time is None:
                text_time = media_text_time(tokens == c.image_id) + count[:, None]
        elif text_time is None:
            text_time = media_text_time(tokens == c.image_id)
        if from_cache:       # the media keys/values sit in the gated blocks' cache; only the mask is new
            media_valid = jnp.asarray(media_valid, bool)
            inserted = (None, masks_lib.flamingo_media_mask(text_time, media_valid, c.resampler.num_latents))
        elif media_offset is not None:      # new media written at their slots of the cache
            if not decode or media_valid is None:
                raise ValueError("Flamingo(media_offset=...) adds media to the decode cache: it needs decode=True and "
                                 "media_valid [B, M] for every slot of the cache.")
            b, mn, r, d = latents.shape
            media_valid = jnp.asarray(media_valid, bool)
            inserted = (latents.reshape(b, mn * r, d), masks_lib.flamingo_media_mask(text_time, media_valid, r),
                        jnp.asarray(media_offset, jnp.int32) * r)
        else:
            inserted = cross_attention_inputs(latents, text_time, media_valid)
        out = self.lm(inputs_embeds=self.embed_tokens(tokens), attention_mask=attention_mask,
                      position_ids=position_ids, inserted_inputs=inserted, deterministic=deterministic,
                      decode=decode, key_valid=key_valid)
        return out._replace(logits=self.logits_from_hidden(out.hidden))


# ------------------------------------------------------------------------------ loss mask
def interleaved_label_mask(tokens, image_id: int, eoc_id: int, pad_id: int):
    """bool ``[B, T]``: which tokens are trained as *targets* (open_flamingo's ``labels != -100``).

    open_flamingo's interleaved (MMC4) training keeps token t as a target unless it is
      - padding,
      - at or before the first ``<image>`` of its row (a row without an image trains nothing),
      - an ``<image>`` marker (the model never learns to emit images),
      - after an ``<|endofchunk|>`` and before the next ``<image>`` (text there belongs to no image;
        the ``<|endofchunk|>`` token itself *is* trained: the model learns where a chunk ends).
    One deliberate difference: open_flamingo also blanks label 0 *before* its scan for the first
    ``<image>``, so a row that opens with ``<image>`` at t = 0 (no BOS token) loses its whole first
    chunk, up to the second ``<image>``; here that chunk is trained, as the rule intends (position
    0 itself is never a target either way). Vectorised: with li[t] the
    last ``<image>`` at or before t and le[t] the last ``<|endofchunk|>`` strictly before t, a
    non-pad, non-image token is a target iff ``li[t] >= 0 and le[t] < li[t]``. See
    `interleaved_loss_mask` for the hand example.
    """
    tokens = jnp.asarray(tokens)
    check_tokens(tokens, "tokens")
    if image_id == eoc_id:
        raise ValueError(f"interleaved_label_mask: image_id and eoc_id are both {image_id}.")
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    is_image = tokens == image_id
    last_image = jax.lax.cummax(jnp.where(is_image, pos, -1), axis=1)
    last_eoc = jax.lax.cummax(jnp.where(tokens == eoc_id, pos, -1), axis=1)
    eoc_before = jnp.pad(last_eoc[:, :-1], ((0, 0), (1, 0)), constant_values=-1)       # strictly before t
    return (last_image >= 0) & (eoc_before < last_image) & ~is_image & (tokens != pad_id)


def interleaved_loss_mask(tokens, image_id: int, eoc_id: int, pad_id: int):
    """bool ``[B, T]``: the positions t whose *next-token* prediction (logits[t] -> tokens[t+1]) is
    trained, i.e. `interleaved_label_mask` shifted left by one (the last position never is).
    Use it as ``masked_cross_entropy(logits[:, :-1], tokens[:, 1:], mask[:, :-1])``.

    Hand example (``I`` = ``<image>``, ``E`` = ``<|endofchunk|>``, ``_`` = pad)::

        t        0  1  2  3  4  5  6  7  8  9  10
        token    a  I  b  c  E  d  I  e  E  _  _
        target   .  .  x  x  x  .  .  x  x  .  .     a: before the first image; I: a marker;
                                                    d: after E, before the next I; _: padding
        mask     .  x  x  x  .  .  x  x  .  .  .     (position t predicts token t+1)
    """
    label = interleaved_label_mask(tokens, image_id, eoc_id, pad_id)
    return jnp.concatenate([label[:, 1:], jnp.zeros_like(label[:, :1])], axis=1)


# ------------------------------------------------------------------------- optimizer groups
VISION_SUBTREE, LM_SUBTREE = "vision", "lm"
FROZEN_VISION_PATTERN = r"vision/.*"
# every LM parameter except the inserted gated blocks (``lm/inserted_m/..``, scanned ``lm/layers/inserted_m/..``)
FROZEN_LM_PATTERN = r"lm/(?!(?:.*/)?inserted_\d+/).*"


def param_groups(*, freeze_vision: bool = True, freeze_lm: bool = True, vision_dtype: str = "",
                 lm_dtype: str = "") -> tuple:
    """Flamingo's default `vlm_jax.optim.ParamGroup`s: the vision tower (``vision/..``) and the LM's own
    parameters (``lm/..``, its original token table included) frozen, stored in ``vision_dtype`` /
    ``lm_dtype`` ('' = the train param dtype). Unclaimed, hence trainable with the defaults:
    ``resampler/..``, ``media_proj/..``, ``lm/(layers/)inserted_m/..``, ``extra_embed/..``,
    ``extra_lm_head/..``."""
    from vlm_jax.optim import ParamGroup        # lazy: models import only jax/flax
    groups = []
    if freeze_vision:
        groups.append(ParamGroup("frozen_vision", pattern=FROZEN_VISION_PATTERN, trainable=False, dtype=vision_dtype))
    if freeze_lm:
        groups.append(ParamGroup("frozen_lm", pattern=FROZEN_LM_PATTERN, trainable=False, dtype=lm_dtype))
    return tuple(groups)
