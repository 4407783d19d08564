"""HF BLIP-2 checkpoints -> `vlm_jax.models.blip2.Blip2QFormerModel`.

Architectures (the ``architectures[0]`` of config.json):
  Blip2ForImageTextRetrieval -> Blip2QFormerModel(vision=VisionTransformer(EVA style), config=Blip2Config(...))
                                with the Q-Former's text input and no ITG LM head
                                (``QFormerConfig(text_input=True, lm_head=False)``)

  Blip2ForConditionalGeneration -> Blip2LMModel(vision=VisionTransformer, config=Blip2LMConfig(...)) with
                                the image-only Q-Former and an OPT (DecoderLM) or T5 language model
                                (the stage-2 section at the end of this file says what maps where)

What maps where (file key -> our parameter; ``{i}`` the layer):

  vision_model.*                         -> vision/... (`vlm_jax.convert.vision.vit_rules`, style
                                            'blip2': fused qkv split into q/k/v)
  vision_model.post_layernorm            -> ln_vision  AND  vision/final_norm (see below)
  query_tokens [1, Q, D]                 -> qformer/query_tokens [Q, D]
  embeddings.word_embeddings / position_embeddings -> qformer/word_embed, qformer/position_embed
  qformer.layernorm                      -> qformer/embed_norm (HF applies it in Blip2QFormerModel
                                            over [queries; word + position], as ours does)
  qformer.encoder.layer.{i}.attention.{attention|self}.query/key/value, .output.dense
                                         -> layers_{i}/attn/...;   .output.LayerNorm -> attn_norm
  ... .crossattention.* (layers 0, k, 2k, ..) -> layers_{i}/cross_attn, cross_norm
  ... .intermediate.dense / .output.dense / .output.LayerNorm            -> mlp/wi, mlp/wo, mlp_norm
  ... .intermediate_query.dense / .output_query.dense / .output_query.LayerNorm
                                         -> query_mlp/wi, query_mlp/wo, query_mlp_norm
  vision_projection / text_projection / itm_head -> vision_proj / text_proj / itm_head

transformers names the Q-Former attention projections ``attention.attention.*``; BERT-style
names (``attention.self.*``) are read too, chosen by what the file holds (and legacy LayerNorm
``gamma/beta``).

Two choices the strict checker forces, made explicit:

* ``post_layernorm``. HF's ``Blip2VisionModel`` applies ``post_layernorm`` to every token, and
  the retrieval model feeds that ``last_hidden_state`` to the Q-Former: it *is* BLIP-2's
  ``ln_vision``. Our model calls the ViT with ``apply_final_norm=False`` and applies its own
  ``ln_vision``, while the ViT module still owns a ``final_norm``. Both are filled from
  ``post_layernorm``: ``ln_vision`` is what the model uses; ``vision/final_norm`` holds the same
  values so the imported ViT alone (``model.vision``) still reproduces HF's vision tower
  (``last_hidden_state``, pooled). ``feature_layer`` is -1: HF's vision config already has the
  layer count BLIP-2 uses (39 of EVA's 40 blocks).
* ``temp``. HF checkpoints carry no ITC temperature (transformers has no ITC loss). ``temp`` is
  filled with ``Blip2Config.init_temperature`` (0.07 unless overridden with
  ``init_temperature=...``) by a rule with a constant transform. `Rule` needs a file key to
  hang on, so the rule names ``query_tokens`` and ignores its value.

HF config fields used: ``num_query_tokens``, ``image_text_hidden_size``, ``qformer_config``
(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size,
max_position_embeddings, cross_attention_frequency, layer_norm_eps, hidden_act,
encoder_hidden_size — checked equal to the vision width — and use_qformer_text_input, which
must be true), ``vision_config`` (as `vlm_jax.convert.vision.vit_config_from_hf`, and its
layer_norm_eps for ``ln_vision``). Dropout rates are not taken from the file (inference /
frozen-tower defaults of 0; set them by override). ``image_token_index``: when set, HF's
processor prepends Q image placeholder tokens to ``input_ids`` that the retrieval forward
strips again; our model takes the plain text, so drop those first Q tokens before calling it.

Overrides (``load_hf(path, **overrides)``): a key that is a field of both `ViTConfig` and
`QFormerConfig` (``scan_layers``, ``remat_policy``, ``implementation``, ``dropout_rate``,
``attention_dropout_rate``) applies to both towers; a field of only one applies there; a
`Blip2Config` field sets it (``init_temperature`` is the useful one; the others come from the
file); ``vision={...}`` / ``qformer={...}`` address one tower explicitly. ``lm_head`` and
``text_input`` are fixed by the architecture and rejected. With ``scan_layers=True``
the Q-Former needs ``num_hidden_layers`` to be a multiple of ``cross_attention_frequency``
(a periodic layout; `QFormerConfig` says so otherwise). The converted ``layers_i`` are
stacked into the scanned layout through `Conversion.stack` (containers ``('vision',
'encoder')`` and ``('qformer',)``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert.common import Conversion, ConversionError, rule
from vlm_jax.convert.text import _attention, _dense, _layer_norm
from vlm_jax.convert.vision import hf_activation, vit_config_from_hf, vit_rules
from vlm_jax.layers.vit import ViTConfig, VisionTransformer
from vlm_jax.models.blip2 import Blip2Config, Blip2QFormerModel, QFormerConfig

_QFORMER_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
                         layer_norm_eps=1e-12, cross_attention_frequency=2, encoder_hidden_size=1408,
                         use_qformer_text_input=False, position_embedding_type="absolute")
_BLIP2_DEFAULTS = dict(num_query_tokens=32, image_text_hidden_size=256)
_DERIVED = ("lm_head", "text_input")        # fixed by the architecture, not overridable


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _split_overrides(overrides: dict) -> tuple[dict, dict, dict]:
    """-> (ViTConfig overrides, QFormerConfig overrides, Blip2Config overrides)."""
    vit_f, q_f, b_f = _fields(ViTConfig), _fields(QFormerConfig), _fields(Blip2Config) - {"qformer"}
    vis, qf, top = dict(overrides.pop("vision", None) or {}), dict(overrides.pop("qformer", None) or {}), {}
    for k, v in overrides.items():
        if k in vit_f or k in q_f:
            if k in vit_f:
                vis[k] = v
            if k in q_f:
                qf[k] = v
        elif k in b_f:
            top[k] = v
        else:
            raise ConversionError(f"unknown override {k!r} for a BLIP-2 checkpoint; use a field of ViTConfig "
                                  f"{sorted(vit_f)}, QFormerConfig {sorted(q_f)} or Blip2Config {sorted(b_f)}, "
                                  "or vision={...} / qformer={...}.")
    bad = sorted(set(qf) & set(_DERIVED))
    if bad:
        raise ConversionError(f"QFormerConfig {bad} are set by the architecture (a retrieval checkpoint has the "
                              "text input and no ITG LM head); they cannot be overridden.")
    for name, d, allowed in (("vision", vis, vit_f), ("qformer", qf, q_f)):
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ConversionError(f"unknown {name} override(s) {unknown}; fields are {sorted(allowed)}.")
    return vis, qf, top


def blip2_retrieval_configs(hf: dict, **overrides) -> tuple[ViTConfig, Blip2Config]:
    """(`ViTConfig`, `Blip2Config`) of a ``Blip2ForImageTextRetrieval`` config.json dict."""
    for key in ("vision_config", "qformer_config"):
        if key not in hf:
            raise ConversionError(f"BLIP-2 config.json has no {key!r}.")
    vis_o, q_o, top_o = _split_overrides(dict(overrides))
    vcfg = vit_config_from_hf(hf["vision_config"], "blip2", **vis_o)
    q = {**_QFORMER_DEFAULTS, **{k: v for k, v in hf["qformer_config"].items() if v is not None}}
    b = {**_BLIP2_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if not q["use_qformer_text_input"]:
        raise ConversionError("qformer_config.use_qformer_text_input is false: the Q-Former has no text FFN, "
                              "which Blip2ForImageTextRetrieval needs (its ITM/ITC text passes).")
    if q["position_embedding_type"] != "absolute":
        raise ConversionError(f"qformer_config.position_embedding_type={q['position_embedding_type']!r}: only "
                              "'absolute' is supported.")
    if q["encoder_hidden_size"] != vcfg.hidden_size:
        raise ConversionError(f"qformer_config.encoder_hidden_size={q['encoder_hidden_size']} differs from the "
                              f"vision width vision_config.hidden_size={vcfg.hidden_size}.")
    qcfg = QFormerConfig(
        num_queries=b["num_query_tokens"], width=q["hidden_size"], num_layers=q["num_hidden_layers"],
        num_heads=q["num_attention_heads"], mlp_dim=q["intermediate_size"], vocab_size=q["vocab_size"],
        max_positions=q["max_position_embeddings"], cross_attention_every=q["cross_attention_frequency"],
        norm_eps=q["layer_norm_eps"], activation=hf_activation(q["hidden_act"]), text_input=True, lm_head=False)
    try:
        qcfg = dataclasses.replace(qcfg, **q_o)
        cfg = Blip2Config(qformer=qcfg, embed_dim=b["image_text_hidden_size"], feature_layer=-1,
                          vision_norm_eps=vcfg.norm_eps)
        return vcfg, dataclasses.replace(cfg, **top_o)
    except ValueError as e:       # e.g. scan_layers=True over a non-periodic cross-attention layout
        raise ConversionError(f"this BLIP-2 checkpoint cannot be built with overrides {overrides}: {e}") from None


def qformer_rules(cfg: QFormerConfig, keys: set[str], prefix: str = "qformer.",
                  module_prefix: tuple[str, ...] = ("qformer",)) -> list:
    """Rules for the Q-Former's layers and ``layernorm`` (keys ``{prefix}encoder.layer.{i}...``);
    unrolled layout ``layers_i``. The text FFN (``intermediate``/``output``) only when
    ``cfg.text_input``."""
    mp, h = module_prefix, cfg.num_heads
    rs = _layer_norm(mp, "embed_norm", prefix + "layernorm.", keys)
    inner = "self" if f"{prefix}encoder.layer.0.attention.self.query.weight" in keys else "attention"
    for i in range(cfg.num_layers):
        t, o = f"{prefix}encoder.layer.{i}.", f"layers_{i}"
        for ours, theirs, present in (("attn", "attention", True),
                                      ("cross_attn", "crossattention", i % cfg.cross_attention_every == 0)):
            if not present:
                continue
            s = f"{t}{theirs}.{inner}."
            rs += _attention(mp, f"{o}/{ours}", h, s + "query", s + "key", s + "value", f"{t}{theirs}.output.dense")
            norm = "attn_norm" if ours == "attn" else "cross_norm"
            rs += _layer_norm(mp, f"{o}/{norm}", f"{t}{theirs}.output.LayerNorm.", keys)
        ffns = [("query_mlp", "_query")] + ([("mlp", "")] if cfg.text_input else [])
        for ours, suffix in ffns:
            rs += _dense(mp, f"{o}/{ours}/wi", f"{t}intermediate{suffix}.dense")
            rs += _dense(mp, f"{o}/{ours}/wo", f"{t}output{suffix}.dense")
            rs += _layer_norm(mp, f"{o}/{ours}_norm", f"{t}output{suffix}.LayerNorm.", keys)
    return rs


def blip2_retrieval_rules(vcfg: ViTConfig, cfg: Blip2Config, keys: set[str]) -> list:
    """All rules of a ``Blip2ForImageTextRetrieval`` file (unrolled layouts)."""
    temp = np.float32(cfg.init_temperature)
    rs = vit_rules(vcfg, "blip2", prefix="vision_model.", module_prefix=("vision",))
    rs += _layer_norm((), "ln_vision", "vision_model.post_layernorm.", keys)
    rs += [rule("qformer/query_tokens", "query_tokens", lambda x: np.asarray(x).reshape(np.shape(x)[-2:])),
           rule("qformer/word_embed/embedding", "embeddings.word_embeddings.weight"),
           rule("qformer/position_embed/embedding", "embeddings.position_embeddings.weight"),
           # HF has no temperature: a constant (init_temperature); query_tokens only carries the rule
           rule("temp", "query_tokens", lambda _: temp)]
    rs += qformer_rules(cfg.qformer, keys)
    rs += _dense((), "vision_proj", "vision_projection")
    rs += _dense((), "text_proj", "text_projection")
    rs += _dense((), "itm_head", "itm_head")
    return rs


def blip2_retrieval(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                    **overrides) -> Conversion:
    """Blip2ForImageTextRetrieval checkpoint -> Blip2QFormerModel (ITC + ITM heads, no LM head)."""
    vcfg, cfg = blip2_retrieval_configs(hf, **overrides)
    module = Blip2QFormerModel(vision=VisionTransformer(vcfg, dtype=dtype, param_dtype=param_dtype), config=cfg,
                               dtype=dtype, param_dtype=param_dtype)
    s = vcfg.image_size
    init_args = (jax.ShapeDtypeStruct((1, s, s, vcfg.num_channels), jnp.float32),
                 jax.ShapeDtypeStruct((1, 2), jnp.int32), jax.ShapeDtypeStruct((1, 2), jnp.bool_))
    ignore = (r"embeddings\.position_ids", r"vision_model\.embeddings\.position_ids")
    return Conversion(module=module, init_args=init_args, rules=blip2_retrieval_rules(vcfg, cfg, keys),
                      ignore=ignore, stack=((("vision", "encoder"), vcfg.num_layers),
                                            (("qformer",), cfg.qformer.num_layers)))


CONVERTERS = {
    "Blip2ForImageTextRetrieval": blip2_retrieval,
}


# ============================================================================== stage 2
# Blip2ForConditionalGeneration -> vlm_jax.models.blip2.Blip2LMModel
#
#   vision_model.*, post_layernorm         -> vision/..., ln_vision (+ vision/final_norm), as above
#   query_tokens                           -> qformer/query_tokens
#   qformer.layernorm, qformer.encoder.*   -> qformer/... (image-only: no word/position embeddings;
#                                             no text FFN unless use_qformer_text_input, whose text
#                                             FFN HF never runs in this model: ignored)
#   language_projection                    -> language_projection [D, E]
#   language_model.model.decoder.* (OPT)   -> lm/... (`vlm_jax.convert.text.opt_rules`); a tied
#     language_model.lm_head.weight          is usually absent from the file (tied to embed_tokens);
#                                             when present it must equal it, unless untied
#   language_model.* (T5)                  -> lm/... (`vlm_jax.convert.text.t5_rules`); an untied
#                                             ``language_model.lm_head.weight`` (Flan-T5) -> lm/lm_head
#
# HF config fields: ``text_config`` (model_type 'opt' or 't5', read as by the text converters),
# ``num_query_tokens``, ``qformer_config``, ``vision_config``. ``image_token_index`` is the id of
# the Q placeholders HF's processor puts in front of ``input_ids``; our model takes the image and
# the tokens after those placeholders (drop the first Q columns of input_ids / attention_mask).
# Overrides: as for the retrieval model (vision / qformer fields or ``vision={..}``,
# ``qformer={..}``), plus fields of the LM config (``DecoderLMConfig`` / ``T5Config``) or
# ``lm={..}``, and ``Blip2LMConfig`` fields (``feature_layer``, ``vision_norm_eps``,
# ``decoder_start_id``). A field shared by the towers (``scan_layers``, ``remat_policy``,
# ``implementation``, ``dropout_rate``) applies to each tower that has it.

from vlm_jax.convert.text import opt_config_from_hf, opt_rules, t5_config_from_hf, t5_rules  # noqa: E402
from vlm_jax.layers.decoder_lm import DecoderLMConfig  # noqa: E402
from vlm_jax.layers.t5 import T5Config  # noqa: E402
from vlm_jax.models.blip2 import Blip2LMConfig, Blip2LMModel  # noqa: E402

_LM_PREFIX = "language_model."
_LM_TYPES = {"opt": DecoderLMConfig, "t5": T5Config}
_STAGE2_TOP = ("feature_layer", "vision_norm_eps", "decoder_start_id")


def _split_generation_overrides(overrides: dict, lm_cls) -> tuple[dict, dict, dict, dict]:
    """-> (ViTConfig, QFormerConfig, LM config, Blip2LMConfig) overrides."""
    o = dict(overrides)
    lm = dict(o.pop("lm", None) or {})
    top = {k: o.pop(k) for k in list(o) if k in _STAGE2_TOP}
    lm_f, shared = _fields(lm_cls), _fields(ViTConfig) | _fields(QFormerConfig)
    for k in list(o):
        if k in lm_f:
            lm[k] = o[k] if k in shared else o.pop(k)
    unknown_lm = sorted(set(lm) - lm_f)
    if unknown_lm:
        raise ConversionError(f"unknown lm override(s) {unknown_lm} for {lm_cls.__name__}; fields are {sorted(lm_f)}.")
    vis, qf, rest = _split_overrides(o)
    if rest:
        raise ConversionError(f"override(s) {sorted(rest)} do not apply to Blip2ForConditionalGeneration (they are "
                              f"stage-1 Blip2Config fields); Blip2LMConfig takes {list(_STAGE2_TOP)}.")
    return vis, qf, lm, top


def _lm_type(hf: dict) -> str:
    t = (hf.get("text_config") or {}).get("model_type", "opt")
    if t not in _LM_TYPES:
        raise ConversionError(f"Blip2ForConditionalGeneration with a {t!r} language model is not supported; "
                              f"supported text_config.model_type: {sorted(_LM_TYPES)}.")
    return t


def _lm_keys(keys: set[str]) -> set[str]:
    """The language model's tensor names without the ``language_model.`` prefix."""
    return {k[len(_LM_PREFIX):] for k in keys if k.startswith(_LM_PREFIX)}


def blip2_generation_configs(hf: dict, keys: set[str] = frozenset(), **overrides) -> tuple[ViTConfig, Blip2LMConfig]:
    """(`ViTConfig`, `Blip2LMConfig`) of a ``Blip2ForConditionalGeneration`` config.json dict."""
    for key in ("vision_config", "qformer_config", "text_config"):
        if key not in hf:
            raise ConversionError(f"BLIP-2 config.json has no {key!r}.")
    lm_type = _lm_type(hf)
    vis_o, q_o, lm_o, top_o = _split_generation_overrides(overrides, _LM_TYPES[lm_type])
    vcfg = vit_config_from_hf(hf["vision_config"], "blip2", **vis_o)
    q = {**_QFORMER_DEFAULTS, **{k: v for k, v in hf["qformer_config"].items() if v is not None}}
    b = {**_BLIP2_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if q["encoder_hidden_size"] != vcfg.hidden_size:
        raise ConversionError(f"qformer_config.encoder_hidden_size={q['encoder_hidden_size']} differs from the "
                              f"vision width vision_config.hidden_size={vcfg.hidden_size}.")
    if lm_type == "opt":
        lcfg = opt_config_from_hf(hf["text_config"], **lm_o)
    else:
        lcfg = t5_config_from_hf(hf["text_config"], _lm_keys(keys), **lm_o)
    qcfg = QFormerConfig(
        num_queries=b["num_query_tokens"], width=q["hidden_size"], num_layers=q["num_hidden_layers"],
        num_heads=q["num_attention_heads"], mlp_dim=q["intermediate_size"], vocab_size=q["vocab_size"],
        max_positions=q["max_position_embeddings"], cross_attention_every=q["cross_attention_frequency"],
        norm_eps=q["layer_norm_eps"], activation=hf_activation(q["hidden_act"]), text_input=False, lm_head=False)
    start = hf["text_config"].get("decoder_start_token_id")
    try:
        qcfg = dataclasses.replace(qcfg, **q_o)
        cfg = Blip2LMConfig(lm=lcfg, qformer=qcfg, feature_layer=-1, vision_norm_eps=vcfg.norm_eps,
                            decoder_start_id=0 if start is None else int(start))
        return vcfg, dataclasses.replace(cfg, **top_o)
    except ValueError as e:
        raise ConversionError(f"this BLIP-2 checkpoint cannot be built with overrides {overrides}: {e}") from None


def _rekey(rules: list, mapping: dict[str, str]) -> list:
    """Rules with some file keys renamed (the OPT rules name the head ``lm_head.weight``, unprefixed)."""
    return [dataclasses.replace(r, hf_keys=tuple(mapping.get(k, k) for k in r.hf_keys)) for r in rules]


def blip2_generation_rules(vcfg: ViTConfig, cfg: Blip2LMConfig, keys: set[str]) -> list:
    """All rules of a ``Blip2ForConditionalGeneration`` file (unrolled layouts)."""
    rs = vit_rules(vcfg, "blip2", prefix="vision_model.", module_prefix=("vision",))
    rs += _layer_norm((), "ln_vision", "vision_model.post_layernorm.", keys)
    rs += [rule("qformer/query_tokens", "query_tokens", lambda x: np.asarray(x).reshape(np.shape(x)[-2:]))]
    rs += qformer_rules(cfg.qformer, keys)
    rs += _dense((), "language_projection", "language_projection")
    lm = ("lm",)
    if cfg.seq2seq:
        rs += t5_rules(cfg.lm, keys, prefix=_LM_PREFIX, module_prefix=lm)
    else:
        head = _LM_PREFIX + "lm_head.weight"
        opt_keys = set(keys) | ({"lm_head.weight"} if head in keys else set())
        prefix = _LM_PREFIX + ("model.decoder." if any(k.startswith(_LM_PREFIX + "model.decoder.") for k in keys)
                               else "decoder.")
        rs += _rekey(opt_rules(cfg.lm, opt_keys, prefix=prefix, module_prefix=lm), {"lm_head.weight": head})
    return rs


def blip2_generation(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                     **overrides) -> Conversion:
    """Blip2ForConditionalGeneration checkpoint (OPT or T5 language model) -> Blip2LMModel."""
    vcfg, cfg = blip2_generation_configs(hf, keys, **overrides)
    module = Blip2LMModel(vision=VisionTransformer(vcfg, dtype=dtype, param_dtype=param_dtype), config=cfg,
                          dtype=dtype, param_dtype=param_dtype)
    s = vcfg.image_size
    init_args = (jax.ShapeDtypeStruct((1, s, s, vcfg.num_channels), jnp.float32),
                 jax.ShapeDtypeStruct((1, 2), jnp.int32))
    ignore = [r"vision_model\.embeddings\.position_ids"]
    if hf["qformer_config"].get("use_qformer_text_input"):
        # the text FFN of a Q-Former built with text input: HF's generation model never runs it
        ignore.append(r"qformer\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias)")
    stack = [(("vision", "encoder"), vcfg.num_layers), (("qformer",), cfg.qformer.num_layers)]
    if cfg.seq2seq:
        ignore.append(r"language_model\.decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight")
        stack += [(("lm", "encoder"), cfg.lm.num_layers), (("lm", "decoder"), cfg.lm.decoder_layers)]
    else:
        stack.append((("lm",), cfg.lm.num_layers))
    return Conversion(module=module, init_args=init_args, rules=blip2_generation_rules(vcfg, cfg, keys),
                      ignore=tuple(ignore), stack=tuple(stack))


CONVERTERS["Blip2ForConditionalGeneration"] = blip2_generation
