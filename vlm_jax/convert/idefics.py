"""HF IDEFICS checkpoints (``IdeficsForVisionText2Text``, the open Flamingo reproduction) ->
`vlm_jax.models.flamingo.Flamingo`.

    module, variables, hf_config = vlm_jax.convert.load_hf("/path/to/idefics")   # + overrides
    tt = idefics_text_time(tokens, module.config.image_id, hf_config["eos_token_id"])
    logits = module.apply(variables, tokens, images, attention_mask=mask, text_time=tt).logits

What maps where (file key -> our parameter; ``{i}`` a layer, ``{j}`` a cross-attention block):

  model.vision_model.*                    -> vision/... (CLIP style, `vlm_jax.convert.vision.vit_rules`;
                                             ``post_layernorm`` -> vision/final_norm, which only the
                                             pooled [CLS] uses: IDEFICS feeds the raw last layer)
  model.perceiver_resampler.latents       -> resampler/latents
  ...blocks.{i}.0.latents_layer_norm / context_layer_norm -> resampler/layers_{i}/latents_norm / media_norm
  ...blocks.{i}.0.q_proj / k_proj / v_proj / output_proj  -> resampler/layers_{i}/attn/query/key/value/out
  ...blocks.{i}.0.q_layer_norm / k_layer_norm             -> .../attn/query_norm / key_norm (qk_layer_norms_perceiver)
  ...blocks.{i}.1.ln / fc / c_proj        -> resampler/layers_{i}/mlp_norm, mlp/wi, mlp/wo (ReLU, 4 Dv)
  model.perceiver_resampler.layer_norm    -> resampler/final_norm
  (none)                                  -> resampler/time_embed [1, Dv] = 0 (IDEFICS has no time
                                             embedding; a constant rule hung on ``latents``)
  model.embed_tokens.weight, model.layers.{i}.*, model.norm.weight, lm_head.weight
                                          -> lm/... (`vlm_jax.convert.text.llama_rules`: rotary,
                                             RMSNorm, SwiGLU; lm_head absent or equal when tied)
  model.gated_cross_attn_layers.{j}.input_layernorm / cross_attn.{q,k,v,o}_proj /
      cross_attn.{q,k}_layer_norm / post_attention_layernorm / mlp.{gate,up,down}_proj /
      alpha_cross_attn / alpha_dense      -> lm/inserted_{j}/cross_norm, cross_attn/..., query_norm /
                                             key_norm, mlp_norm, mlp/wi_0, wi_1, wo, alpha_xattn,
                                             alpha_dense (block j sits before LM layer
                                             j * cross_layer_interval: ``xattn_offset=0``)
  model.embed_tokens.additional_embedding.weight -> extra_embed/embedding [X, E] (ids V .. V+X-1)
  lm_head.additional_fc.weight            -> extra_lm_head/kernel (untied); tied: absent or equal to
                                             the additional embedding (IDEFICS ties them together
                                             with ``tie_word_embeddings``)

Config mapping: LM from the top level (vocab_size V, hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, rms_norm_eps, max_position_embeddings, rope_parameters /
rope_theta, tie_word_embeddings; hidden_act must be 'silu'); the gated blocks use the LM's
heads (K = D / H), MLP and RMSNorm (``GatedXAttnConfig(activation='gated_silu',
norm_type='rmsnorm', qk_norm=qk_layer_norms, gate='vector' if alpha_type == 'vector')``),
``xattn_every = cross_layer_interval``, ``xattn_offset = 0``; vision from ``vision_config``
(``embed_dim`` is the width; IDEFICS' default hidden_act is exact 'gelu'); resampler from
``perceiver_config`` (width = the vision width, ``mlp_dim = 4 Dv``, 'relu', LayerNorm eps 1e-5,
``qk_norm = qk_layer_norms_perceiver``, ``max_frames=1``); ``vision_tokens='all'`` (CLIP's whole
last_hidden_state, [CLS] included), ``feature_layer=-1``; ``num_extra_tokens =
additional_vocab_size``.

Token ids: ``image_token_id`` defaults to V + 1 when X >= 2 (the IDEFICS tokenizer adds
``<fake_token_around_image>`` = V, then ``<image>`` = V + 1), V when X == 1; X == 0 needs the
override. ``eoc_token_id`` (Flamingo's ``<|endofchunk|>``, used only by the loss mask) defaults to
the config's ``eos_token_id``: after ``</s>`` the IDEFICS processor stops a chunk's image
attention. Either can be overridden (``load_hf(path, image_token_id=..., eoc_token_id=...)``).

Which image a token sees. The processor (``image_attention_mask_for_packed_input_ids``) gives
token t the most recent ``<image>`` at or before t -- Flamingo's rule (`media_text_time`) --
except that after an ``eos_token_id`` token (the eos itself still sees its image) nothing is
seen until the next ``<image>``, and ``<image>`` number > M (the images given) sees nothing.
`idefics_text_time` computes that mapping as ``text_time``; pass it explicitly
(``Flamingo(..., text_time=...)``) whenever a row holds an eos before its last image chunk;
without eos tokens it equals the model's default. `idefics_image_attention_mask` turns it into
HF's ``image_attention_mask [B, T, M]``. While generating, HF reuses the last prompt token's
image row for every new token, whereas `Flamingo`'s decode counter moves on when ``<image>`` is
generated; both agree as long as no ``<image>`` is generated and the prompt does not end after
an eos.

Unsupported (ConversionError naming the field): ``use_resampler=False`` (IDEFICS would feed the
vision tokens straight to the cross-attention; `Flamingo` always resamples), ``alpha_type`` other
than 'float' / 'vector', ``num_hidden_layers`` not a multiple of ``cross_layer_interval`` (HF
itself indexes past its cross-attention layers then), ``hidden_act`` != 'silu', rope types other
than 'default'. Not weights, hence not read: ``freeze_*`` (use `vlm_jax.models.flamingo.param_groups`;
IDEFICS' ``freeze_text_layers`` / ``freeze_vision_layers`` are its defaults too: vision and LM
frozen, the additional rows, resampler and gated blocks trained), ``alpha_initializer`` /
``alphas_initializer_range`` (init only), ``dropout`` (0 here; set ``lm={'dropout_rate': ..}``),
``interpolate_pos_encoding`` (fixed image size).

Overrides (``load_hf(path, **overrides)``): ``image_token_id``, ``eoc_token_id``; ``vision={..}``
(`ViTConfig` fields), ``resampler={..}`` (`PerceiverResamplerConfig`), ``lm={..}``
(`DecoderLMConfig`), ``xattn={..}`` (`GatedXAttnConfig`); ``scan_layers``, ``remat_policy``,
``implementation`` apply to every part that has the field.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert.common import (Conversion, ConversionError, linear, linear_from_heads, linear_to_heads,
                                    rule)
from vlm_jax.convert.text import _layer_norm, _same_as, llama_config_from_hf, llama_rules
from vlm_jax.convert.vision import vit_config_from_hf, vit_rules
from vlm_jax.layers.decoder_lm import DecoderLMConfig
from vlm_jax.layers.vit import ViTConfig
from vlm_jax.models.flamingo import Flamingo, FlamingoConfig, GatedXAttnConfig, PerceiverResamplerConfig

__all__ = ["CONVERTERS", "idefics", "idefics_config", "idefics_rules", "idefics_text_time",
           "idefics_image_attention_mask"]

_TOP_DEFAULTS = dict(vocab_size=32000, additional_vocab_size=0, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, hidden_act="silu", rms_norm_eps=1e-6,
                     tie_word_embeddings=False, cross_layer_interval=1, qk_layer_norms=False, alpha_type="float",
                     use_resampler=False, max_position_embeddings=2048, eos_token_id=2)
_VISION_DEFAULTS = dict(embed_dim=768, image_size=224, intermediate_size=5120, patch_size=14, num_hidden_layers=32,
                        num_attention_heads=16, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5)
_PERCEIVER_DEFAULTS = dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16, resampler_head_dim=96,
                           qk_layer_norms_perceiver=False)
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
               "rope_theta", "rope_scaling")
_PARTS = {"vision": ViTConfig, "resampler": PerceiverResamplerConfig, "lm": DecoderLMConfig,
          "xattn": GatedXAttnConfig}
_SHARED = ("scan_layers", "remat_policy", "implementation")
_TOP = ("image_token_id", "eoc_token_id")
_ALPHA_TYPES = {"float": "scalar", "vector": "vector"}
_PR = "model.perceiver_resampler."


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _split_overrides(overrides: dict) -> tuple[dict, dict[str, dict]]:
    """-> (FlamingoConfig overrides, {part: overrides})."""
    o = dict(overrides)
    parts = {name: dict(o.pop(name, None) or {}) for name in _PARTS}
    top = {k: o.pop(k) for k in _TOP if k in o}
    for k in _SHARED:
        if k in o:
            v = o.pop(k)
            for name, cls in _PARTS.items():
                if k in _fields(cls):
                    parts[name].setdefault(k, v)
    if o:
        raise ConversionError(f"unknown override(s) {sorted(o)} for an IDEFICS checkpoint; use {list(_TOP)}, "
                              f"{list(_SHARED)} or part dicts {sorted(_PARTS)} (e.g. lm={{'dropout_rate': 0.1}}).")
    for name, cls in _PARTS.items():
        bad = sorted(set(parts[name]) - _fields(cls))
        if bad:
            raise ConversionError(f"unknown {name} override(s) {bad}; {cls.__name__} fields are "
                                  f"{sorted(_fields(cls))}.")
    return top, parts


def _with_defaults(defaults: dict, d: dict | None) -> dict:
    return {**defaults, **{k: v for k, v in (d or {}).items() if v is not None}}


def idefics_config(hf: dict, **overrides) -> FlamingoConfig:
    """The `FlamingoConfig` of an ``IdeficsForVisionText2Text`` config.json dict (module docstring)."""
    top_o, parts = _split_overrides(overrides)
    h = _with_defaults(_TOP_DEFAULTS, hf)
    if not h["use_resampler"]:
        raise ConversionError("IDEFICS use_resampler=False is not supported: that model feeds the vision tokens "
                              "straight to the cross-attention, while Flamingo always runs a Perceiver Resampler.")
    if h["alpha_type"] not in _ALPHA_TYPES:
        raise ConversionError(f"IDEFICS alpha_type={h['alpha_type']!r} is not supported; use one of "
                              f"{sorted(_ALPHA_TYPES)}.")
    every, layers = int(h["cross_layer_interval"]), int(h["num_hidden_layers"])
    if every < 1 or layers % every:
        raise ConversionError(f"IDEFICS cross_layer_interval={every} does not divide num_hidden_layers={layers} "
                              "(HF's IdeficsModel indexes past its cross-attention layers then).")
    v = _with_defaults(_VISION_DEFAULTS, hf.get("vision_config"))
    p = _with_defaults(_PERCEIVER_DEFAULTS, hf.get("perceiver_config"))
    clip = dict(hidden_size=v["embed_dim"], image_size=v["image_size"], intermediate_size=v["intermediate_size"],
                patch_size=v["patch_size"], num_hidden_layers=v["num_hidden_layers"],
                num_attention_heads=v["num_attention_heads"], num_channels=v["num_channels"],
                hidden_act=v["hidden_act"], layer_norm_eps=v["layer_norm_eps"])
    vcfg = vit_config_from_hf(clip, "clip", **parts["vision"])
    lm_hf = {k: h[k] for k in _LLAMA_KEYS if k in h}
    lcfg = llama_config_from_hf(lm_hf, **parts["lm"])
    heads, width = int(h["num_attention_heads"]), int(h["hidden_size"])
    nv, x = int(h["vocab_size"]), int(h["additional_vocab_size"])
    try:
        rcfg = PerceiverResamplerConfig(
            width=vcfg.hidden_size, depth=p["resampler_depth"], num_heads=p["resampler_n_heads"],
            head_dim=p["resampler_head_dim"], num_latents=p["resampler_n_latents"], mlp_dim=4 * vcfg.hidden_size,
            activation="relu", max_frames=1, norm_eps=1e-5, qk_norm=bool(p["qk_layer_norms_perceiver"]))
        rcfg = dataclasses.replace(rcfg, **parts["resampler"])
        xcfg = GatedXAttnConfig(num_heads=heads, head_dim=width // heads, mlp_dim=int(h["intermediate_size"]),
                                activation="gated_silu", norm_type="rmsnorm", norm_eps=float(h["rms_norm_eps"]),
                                use_bias=False, qk_norm=bool(h["qk_layer_norms"]), gate=_ALPHA_TYPES[h["alpha_type"]])
        xcfg = dataclasses.replace(xcfg, **parts["xattn"])
    except ValueError as e:
        raise ConversionError(f"this IDEFICS checkpoint cannot be built: {e}") from None
    image_id = top_o.get("image_token_id", nv + 1 if x >= 2 else (nv if x == 1 else None))
    if image_id is None:
        raise ConversionError("IDEFICS additional_vocab_size=0: the <image> id is inside the LM's vocabulary; "
                              "pass image_token_id=... (the tokenizer's id of '<image>').")
    eoc_id = top_o.get("eoc_token_id", h["eos_token_id"])
    if isinstance(eoc_id, (list, tuple)):
        eoc_id = eoc_id[0]
    if eoc_id is None or eoc_id == image_id:
        raise ConversionError(f"IDEFICS eos_token_id={h['eos_token_id']!r} cannot serve as eoc_token_id (None or "
                              f"equal to image_token_id={image_id}); pass eoc_token_id=....")
    try:
        return FlamingoConfig(vision=vcfg, resampler=rcfg, lm=lcfg, xattn=xcfg, xattn_every=every, xattn_offset=0,
                              feature_layer=-1, vision_tokens="all", num_extra_tokens=x, image_token_id=int(image_id),
                              eoc_token_id=int(eoc_id))
    except ValueError as e:
        raise ConversionError(f"this IDEFICS checkpoint cannot be built (image_token_id / eoc_token_id "
                              f"overrides?): {e}") from None


def _reshape(shape):
    return lambda a: np.asarray(a).reshape(shape)


def idefics_rules(cfg: FlamingoConfig, keys: set[str]) -> list:
    """All rules of an ``IdeficsForVisionText2Text`` file (unrolled layouts)."""
    rs = vit_rules(cfg.vision, "clip", prefix="model.vision_model.", module_prefix=("vision",))
    r, d = cfg.resampler, cfg.resampler.width
    rs += [rule("resampler/latents", _PR + "latents"),
           # IDEFICS has no time embedding: zeros (the rule hangs on latents, whose value it ignores)
           rule("resampler/time_embed", _PR + "latents", lambda _: np.zeros((r.max_frames, d), np.float32))]
    for i in range(r.depth):
        b, o = f"{_PR}blocks.{i}.", ("resampler", f"layers_{i}")
        rs += _layer_norm(o, "latents_norm", b + "0.latents_layer_norm.")
        rs += _layer_norm(o, "media_norm", b + "0.context_layer_norm.")
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            rs.append(rule(o + ("attn", ours, "kernel"), f"{b}0.{theirs}.weight", linear_to_heads(r.num_heads)))
        rs.append(rule(o + ("attn", "out", "kernel"), b + "0.output_proj.weight", linear_from_heads(r.num_heads)))
        if r.qk_norm:
            rs += _layer_norm(o, "attn/query_norm", b + "0.q_layer_norm.")
            rs += _layer_norm(o, "attn/key_norm", b + "0.k_layer_norm.")
        rs += _layer_norm(o, "mlp_norm", b + "1.ln.")
        rs += [rule(o + ("mlp", "wi", "kernel"), b + "1.fc.weight", linear),
               rule(o + ("mlp", "wo", "kernel"), b + "1.c_proj.weight", linear)]
    rs += _layer_norm(("resampler",), "final_norm", _PR + "layer_norm.")

    rs += llama_rules(cfg.lm, keys, prefix="model.", module_prefix=("lm",))
    x, h = cfg.xattn, cfg.xattn.num_heads
    gate_shape = () if x.gate == "scalar" else (-1,)
    for j in range(cfg.lm.num_layers // cfg.xattn_every):
        g, o = f"model.gated_cross_attn_layers.{j}.", ("lm", f"inserted_{j}")
        a = g + "cross_attn."
        rs.append(rule(o + ("cross_norm", "scale"), g + "input_layernorm.weight"))
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            rs.append(rule(o + ("cross_attn", ours, "kernel"), f"{a}{theirs}.weight", linear_to_heads(h)))
        rs.append(rule(o + ("cross_attn", "out", "kernel"), a + "o_proj.weight", linear_from_heads(h)))
        if x.qk_norm:
            rs += [rule(o + ("cross_attn", "query_norm", "scale"), a + "q_layer_norm.weight"),
                   rule(o + ("cross_attn", "key_norm", "scale"), a + "k_layer_norm.weight")]
        rs.append(rule(o + ("mlp_norm", "scale"), g + "post_attention_layernorm.weight"))
        for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
            rs.append(rule(o + ("mlp", ours, "kernel"), f"{g}mlp.{theirs}.weight", linear))
        rs += [rule(o + ("alpha_xattn",), g + "alpha_cross_attn", _reshape(gate_shape)),
               rule(o + ("alpha_dense",), g + "alpha_dense", _reshape(gate_shape))]

    if cfg.num_extra_tokens:
        emb, fc = "model.embed_tokens.additional_embedding.weight", "lm_head.additional_fc.weight"
        if not cfg.tied_extra:
            rs += [rule("extra_embed/embedding", emb), rule("extra_lm_head/kernel", fc, linear)]
        elif fc in keys:
            rs.append(rule("extra_embed/embedding", (emb, fc), _same_as(fc)))
        else:
            rs.append(rule("extra_embed/embedding", emb))
    return rs


def idefics(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
            **overrides) -> Conversion:
    """IdeficsForVisionText2Text checkpoint -> Flamingo (module docstring)."""
    cfg = idefics_config(hf, **overrides)
    module = Flamingo(cfg, dtype=dtype, param_dtype=param_dtype)
    s, c = cfg.vision.image_size, cfg.vision.num_channels
    init_args = (jax.ShapeDtypeStruct((1, 2), jnp.int32), jax.ShapeDtypeStruct((1, 1, s, s, c), jnp.float32))
    # buffers some files carry: rotary frequencies (every IdeficsAttention owns one) and CLIP's position ids
    ignore = (r"model\.(layers|gated_cross_attn_layers)\.\d+\.(self_attn|cross_attn)\.rotary_emb\.inv_freq",
              r"model\.vision_model\.embeddings\.position_ids")
    return Conversion(module=module, init_args=init_args, rules=idefics_rules(cfg, keys), ignore=ignore,
                      stack=((("vision", "encoder"), cfg.vision.num_layers), (("lm",), cfg.lm.num_layers)))


# ----------------------------------------------------------------------- masking helpers
def idefics_text_time(tokens, image_token_id: int, eos_token_id: int | None = None):
    """int32 ``[B, T]``: the IDEFICS processor's image of every token as Flamingo's ``text_time``
    (1-based index of the image token t sees; 0 = none).

    As `vlm_jax.models.flamingo.media_text_time` (the most recent ``<image>`` at or before t), but a
    token after an ``eos_token_id`` (strictly after; the eos itself keeps its image) with no
    ``<image>`` in between sees nothing -- ``image_attention_mask_for_packed_input_ids``'s
    ``seen_eod`` rule. Jittable."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T]; got shape {tokens.shape}.")
    is_image = tokens == image_token_id
    count = jnp.cumsum(is_image.astype(jnp.int32), axis=1)
    if eos_token_id is None:
        return count
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    last_image = jax.lax.cummax(jnp.where(is_image, pos, -1), axis=1)
    last_eos = jax.lax.cummax(jnp.where(tokens == eos_token_id, pos, -1), axis=1)
    eos_before = jnp.pad(last_eos[:, :-1], ((0, 0), (1, 0)), constant_values=-1)       # strictly before t
    return jnp.where(eos_before > last_image, 0, count)


def idefics_image_attention_mask(text_time, num_images: int):
    """``text_time [B, T]`` -> HF's ``image_attention_mask`` int32 ``[B, T, M]`` (one-hot of image
    ``text_time - 1``; rows of text_time 0 or > M are all 0, as the processor's
    ``incremental_to_binary_attention_mask``)."""
    tt = jnp.asarray(text_time)
    return (tt[..., None] == jnp.arange(1, num_images + 1)).astype(jnp.int32)


CONVERTERS = {"IdeficsForVisionText2Text": idefics}
