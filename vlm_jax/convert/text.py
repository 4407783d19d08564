"""HF text towers -> `vlm_jax.layers.decoder_lm.DecoderLM`, `vlm_jax.layers.bert.BertEncoder`,
`vlm_jax.layers.t5.T5`.

Architectures (the ``architectures[0]`` of config.json):
  GPT2LMHeadModel / GPT2Model             -> DecoderLM (keys with or without ``transformer.``)
  OPTForCausalLM / OPTModel               -> DecoderLM (keys under ``model.decoder.`` or ``decoder.``;
                                             ``project_in/out`` when word_embed_proj_dim != hidden_size)
  LlamaForCausalLM                        -> DecoderLM with rotary positions, RMSNorm, SwiGLU, no biases
                                             (or attention_bias == mlp_bias == True), grouped-query
                                             attention (num_key_value_heads), explicit head_dim, tied or
                                             untied head; rope_type 'default' only (no rope scaling:
                                             LLaMA-3.1 'llama3', 'linear', 'dynamic', 'yarn' raise)
  BertModel (also BertForPreTraining files) -> BertEncoder (keys with or without ``bert.``;
                                             ``LayerNorm.weight/bias`` or legacy ``gamma/beta``;
                                             pretraining heads ``cls.*`` skipped)
  T5ForConditionalGeneration              -> T5 (an ``lm_head.weight`` in the file means an untied
                                             head, as in T5 v1.1 / Flan-T5)

Each converter is ``fn(hf_config: dict, keys: set[str], *, dtype, param_dtype, **overrides)
-> Conversion`` (the contract of `vlm_jax.convert.common`); ``overrides`` replace fields of
the tower's config dataclass (e.g. ``scan_layers=True``, ``remat_policy='full'``,
``implementation='cudnn'``). The
``*_rules`` functions take a key ``prefix`` and a Flax ``module_prefix`` so composite
checkpoints (BLIP-2's ``language_model.`` / ``qformer.``) can reuse them.

Tied copies: when a file carries both a tied weight and its copy (``lm_head.weight`` next
to the word embedding, T5's ``encoder.embed_tokens.weight``), the copy is checked to be
identical and then dropped; a copy that differs raises `ConversionError` naming the key.

These converters are registered in `vlm_jax.convert.CONVERTERS`; load a directory with
``module, variables, hf_config = vlm_jax.convert.load_hf(path, mesh=None)`` (with a mesh,
every parameter is placed with the sharding its logical axis names give).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.convert.common import (Conversion, ConversionError, bias_to_heads, chunk, linear,
                                    linear_from_heads, linear_to_heads, rule)
from vlm_jax.layers.bert import BertConfig, BertEncoder
from vlm_jax.layers.decoder_lm import DecoderLM, DecoderLMConfig
from vlm_jax.layers.t5 import T5, T5Config

# HF activation names -> vlm_jax.layers.mlp activation names
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "relu": "relu", "quick_gelu": "quick_gelu", "silu": "silu",
                  "swish": "silu"}
T5_FFN = {"relu": "relu", "gelu": "gelu", "gated-gelu": "gated_gelu", "gated-silu": "gated_silu"}

_DEFAULTS = {
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", layer_norm_epsilon=1e-5, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False, add_cross_attention=False, tie_word_embeddings=True),
    "opt": dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, max_position_embeddings=2048,
                do_layer_norm_before=True, _remove_final_layer_norm=False, word_embed_proj_dim=None,
                num_attention_heads=12, activation_function="relu", enable_bias=True,
                layer_norm_elementwise_affine=True, tie_word_embeddings=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False, rope_theta=10000.0, rope_scaling=None,
                  rope_parameters=None),
    "bert": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                 layer_norm_eps=1e-12, position_embedding_type="absolute", add_cross_attention=False),
    "t5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=None,
               num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
               layer_norm_epsilon=1e-6, feed_forward_proj="relu"),
}


def _with_defaults(hf: dict, family: str) -> dict:
    return {**_DEFAULTS[family], **{k: v for k, v in hf.items() if v is not None}}


def _activation(name: str, key: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ConversionError(f"HF {key}={name!r} has no vlm_jax equivalent; known: {sorted(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def _replace(cfg, overrides: dict):
    bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(cfg)})
    if bad:
        raise ConversionError(f"unknown override(s) {bad} for {type(cfg).__name__}; fields: "
                              f"{[f.name for f in dataclasses.fields(cfg)]}.")
    return dataclasses.replace(cfg, **overrides)


def _same_as(copy_key: str) -> Callable:
    """Transform for rule(path, (source, copy)): checks the tied copy equals the source."""
    def f(source, copy):
        if source.shape != copy.shape or not np.array_equal(np.asarray(source), np.asarray(copy)):
            raise ConversionError(f"key {copy_key!r} should be a tied copy of the embedding but differs from it; "
                                  "the config says the weights are tied (tie_word_embeddings).")
        return np.asarray(source)
    return f


def _tied_source(copy_keys) -> Callable:
    """Transform for rule(path, (source, *copies)): every copy must equal the source."""
    def f(source, *copies):
        for k, c in zip(copy_keys, copies):
            _same_as(k)(source, c)
        return np.asarray(source)
    return f


def _p(module_prefix: tuple[str, ...], path: str) -> tuple[str, ...]:
    return ("params",) + tuple(module_prefix) + tuple(path.split("/"))


def _layer_norm(module_prefix, ours: str, theirs: str, keys: set[str] | None = None) -> list:
    """LayerNorm scale/bias from ``theirs.weight/bias`` (or legacy ``gamma/beta``)."""
    w, b = "weight", "bias"
    if keys is not None and theirs + "weight" not in keys and theirs + "gamma" in keys:
        w, b = "gamma", "beta"
    return [rule(_p(module_prefix, f"{ours}/scale"), theirs + w), rule(_p(module_prefix, f"{ours}/bias"), theirs + b)]


def _attention(module_prefix, ours: str, h: int, q: str, k: str, v: str, o: str, bias: bool = True) -> list:
    """q/k/v/out from four torch Linear layers named by key stems (without .weight)."""
    rs = []
    for name, stem in (("query", q), ("key", k), ("value", v)):
        rs.append(rule(_p(module_prefix, f"{ours}/{name}/kernel"), stem + ".weight", linear_to_heads(h)))
        if bias:
            rs.append(rule(_p(module_prefix, f"{ours}/{name}/bias"), stem + ".bias", bias_to_heads(h)))
    rs.append(rule(_p(module_prefix, f"{ours}/out/kernel"), o + ".weight", linear_from_heads(h)))
    if bias:
        rs.append(rule(_p(module_prefix, f"{ours}/out/bias"), o + ".bias"))
    return rs


def _dense(module_prefix, ours: str, stem: str, bias: bool = True) -> list:
    rs = [rule(_p(module_prefix, f"{ours}/kernel"), stem + ".weight", linear)]
    if bias:
        rs.append(rule(_p(module_prefix, f"{ours}/bias"), stem + ".bias"))
    return rs


def _tokens(n: int = 2):
    return jax.ShapeDtypeStruct((1, n), jnp.int32)


def _lm_embedding_rules(mp, cfg: DecoderLMConfig, keys: set[str], token_key: str, position_key: str) -> list:
    """DecoderLM token/position embeddings and LM head (GPT-2 and OPT alike): a tied
    ``lm_head.weight`` present in the file must equal the token embedding; an untied one is
    the head's kernel."""
    lm_head = "lm_head.weight"
    if cfg.tie_embeddings and lm_head in keys:
        rs = [rule(_p(mp, "token_embed/embedding"), (token_key, lm_head), _same_as(lm_head))]
    else:
        rs = [rule(_p(mp, "token_embed/embedding"), token_key)]
    if not cfg.tie_embeddings:
        rs.append(rule(_p(mp, "lm_head/kernel"), lm_head, linear))
    rs.append(rule(_p(mp, "position_embed/embedding"), position_key))
    return rs


# ------------------------------------------------------------------------------- GPT-2
def gpt2_config_from_hf(hf: dict, **overrides) -> DecoderLMConfig:
    h = _with_defaults(hf, "gpt2")
    if not h["scale_attn_weights"] or h["scale_attn_by_inverse_layer_idx"]:
        raise ConversionError("GPT-2 config with scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True "
                              "is not supported (DecoderLM scales logits by 1/sqrt(K)).")
    if h["add_cross_attention"]:
        raise ConversionError("GPT-2 config with add_cross_attention=True is not supported by DecoderLM.")
    cfg = DecoderLMConfig(
        vocab_size=h["vocab_size"], width=h["n_embd"], num_layers=h["n_layer"], num_heads=h["n_head"],
        mlp_dim=h["n_inner"] or 4 * h["n_embd"], max_positions=h["n_positions"],
        activation=_activation(h["activation_function"], "activation_function"), norm_eps=h["layer_norm_epsilon"],
        tie_embeddings=bool(h["tie_word_embeddings"]))
    return _replace(cfg, overrides)


def gpt2_rules(cfg: DecoderLMConfig, keys: set[str], prefix: str = "", module_prefix: tuple[str, ...] = ()) -> list:
    """Rules for GPT-2 keys ``{prefix}wte.weight``, ``{prefix}h.{i}...`` (+ ``lm_head.weight``)."""
    mp, h, d = module_prefix, cfg.num_heads, cfg.width
    rs = _lm_embedding_rules(mp, cfg, keys, prefix + "wte.weight", prefix + "wpe.weight")
    to_heads = lambda w: np.asarray(w).reshape(d, h, d // h)              # noqa: E731  Conv1D is (in, out)
    for i in range(cfg.num_layers):
        t, o = f"{prefix}h.{i}.", f"layers_{i}"
        rs += _layer_norm(mp, f"{o}/attn_norm", t + "ln_1.")
        rs += _layer_norm(mp, f"{o}/mlp_norm", t + "ln_2.")
        for j, name in enumerate(("query", "key", "value")):
            rs.append(rule(_p(mp, f"{o}/attn/{name}/kernel"), t + "attn.c_attn.weight", chunk(j, 3, 1, to_heads)))
            rs.append(rule(_p(mp, f"{o}/attn/{name}/bias"), t + "attn.c_attn.bias", chunk(j, 3, 0, bias_to_heads(h))))
        rs.append(rule(_p(mp, f"{o}/attn/out/kernel"), t + "attn.c_proj.weight",
                       lambda w: np.asarray(w).reshape(h, d // h, d)))
        rs.append(rule(_p(mp, f"{o}/attn/out/bias"), t + "attn.c_proj.bias"))
        rs.append(rule(_p(mp, f"{o}/mlp/wi/kernel"), t + "mlp.c_fc.weight"))
        rs.append(rule(_p(mp, f"{o}/mlp/wi/bias"), t + "mlp.c_fc.bias"))
        rs.append(rule(_p(mp, f"{o}/mlp/wo/kernel"), t + "mlp.c_proj.weight"))
        rs.append(rule(_p(mp, f"{o}/mlp/wo/bias"), t + "mlp.c_proj.bias"))
    rs += _layer_norm(mp, "final_norm", prefix + "ln_f.")
    return rs


def gpt2(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
         **overrides) -> Conversion:
    """GPT2LMHeadModel / GPT2Model checkpoint -> DecoderLM."""
    cfg = gpt2_config_from_hf(hf, **overrides)
    prefix = "transformer." if any(k.startswith("transformer.") for k in keys) else ""
    # the causal-mask buffers of old checkpoints are not weights
    ignore = (rf"{prefix}h\.\d+\.attn\.(masked_)?bias",)
    return Conversion(module=DecoderLM(cfg, dtype=dtype, param_dtype=param_dtype), init_args=(_tokens(),),
                      rules=gpt2_rules(cfg, keys, prefix), ignore=ignore, stack=(((), cfg.num_layers),))


# --------------------------------------------------------------------------------- OPT
def opt_config_from_hf(hf: dict, **overrides) -> DecoderLMConfig:
    h = _with_defaults(hf, "opt")
    if not h["layer_norm_elementwise_affine"]:
        raise ConversionError("OPT config with layer_norm_elementwise_affine=False is not supported.")
    pre = bool(h["do_layer_norm_before"])
    word = h["word_embed_proj_dim"] or h["hidden_size"]
    cfg = DecoderLMConfig(
        vocab_size=h["vocab_size"], width=h["hidden_size"], num_layers=h["num_hidden_layers"],
        num_heads=h["num_attention_heads"], mlp_dim=h["ffn_dim"], max_positions=h["max_position_embeddings"],
        position_offset=2, activation=_activation(h["activation_function"], "activation_function"),
        norm_position="pre" if pre else "post", norm_eps=1e-5, final_norm=pre and not h["_remove_final_layer_norm"],
        embed_dim=word if word != h["hidden_size"] else None, tie_embeddings=bool(h["tie_word_embeddings"]),
        use_bias=bool(h["enable_bias"]))
    return _replace(cfg, overrides)


def opt_rules(cfg: DecoderLMConfig, keys: set[str], prefix: str = "model.decoder.",
              module_prefix: tuple[str, ...] = ()) -> list:
    """Rules for OPT keys ``{prefix}embed_tokens.weight``, ``{prefix}layers.{i}...`` (+ ``lm_head.weight``)."""
    mp, h, bias = module_prefix, cfg.num_heads, cfg.use_bias
    rs = _lm_embedding_rules(mp, cfg, keys, prefix + "embed_tokens.weight", prefix + "embed_positions.weight")
    if cfg.word_dim != cfg.width:
        rs.append(rule(_p(mp, "project_in/kernel"), prefix + "project_in.weight", linear))
        rs.append(rule(_p(mp, "project_out/kernel"), prefix + "project_out.weight", linear))
    for i in range(cfg.num_layers):
        t, o = f"{prefix}layers.{i}.", f"layers_{i}"
        a = t + "self_attn."
        rs += _attention(mp, f"{o}/attn", h, a + "q_proj", a + "k_proj", a + "v_proj", a + "out_proj", bias)
        rs += _layer_norm(mp, f"{o}/attn_norm", t + "self_attn_layer_norm.")
        rs += _dense(mp, f"{o}/mlp/wi", t + "fc1", bias)
        rs += _dense(mp, f"{o}/mlp/wo", t + "fc2", bias)
        rs += _layer_norm(mp, f"{o}/mlp_norm", t + "final_layer_norm.")
    if cfg.final_norm:
        rs += _layer_norm(mp, "final_norm", prefix + "final_layer_norm.")
    return rs


def opt(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
        **overrides) -> Conversion:
    """OPTForCausalLM / OPTModel checkpoint -> DecoderLM."""
    cfg = opt_config_from_hf(hf, **overrides)
    prefix = "model.decoder." if any(k.startswith("model.decoder.") for k in keys) else "decoder."
    return Conversion(module=DecoderLM(cfg, dtype=dtype, param_dtype=param_dtype), init_args=(_tokens(),),
                      rules=opt_rules(cfg, keys, prefix), stack=(((), cfg.num_layers),))


# ------------------------------------------------------------------------------- LLaMA
def _rope(h: dict) -> float:
    """rope_theta of a LLaMA config (transformers >= 5: ``rope_parameters``; 4.x: ``rope_theta`` +
    ``rope_scaling``); raises for any rope type but 'default'."""
    params = h["rope_parameters"] or {}
    scaling = h["rope_scaling"] or {}
    rope_type = params.get("rope_type", params.get("type", scaling.get("rope_type", scaling.get("type", "default"))))
    if rope_type != "default":
        key = "rope_parameters" if h["rope_parameters"] else "rope_scaling"
        raise ConversionError(f"LLaMA {key} rope_type={rope_type!r} is not supported (DecoderLM implements plain "
                              "rotary positions, rope_type 'default').")
    if params.get("partial_rotary_factor", h.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError("LLaMA partial_rotary_factor != 1.0 is not supported.")
    return float(params.get("rope_theta", h["rope_theta"]))


def llama_config_from_hf(hf: dict, **overrides) -> DecoderLMConfig:
    h = _with_defaults(hf, "llama")
    if h["hidden_act"] not in ("silu", "swish"):
        raise ConversionError(f"LLaMA hidden_act={h['hidden_act']!r}: only 'silu' (SwiGLU) is supported.")
    if bool(h["attention_bias"]) != bool(h["mlp_bias"]):
        raise ConversionError(f"LLaMA attention_bias={h['attention_bias']} with mlp_bias={h['mlp_bias']}: "
                              "DecoderLMConfig.use_bias covers both; they must be equal.")
    heads = h["num_attention_heads"]
    head_dim = h["head_dim"] or h["hidden_size"] // heads
    cfg = DecoderLMConfig(
        vocab_size=h["vocab_size"], width=h["hidden_size"], num_layers=h["num_hidden_layers"], num_heads=heads,
        mlp_dim=h["intermediate_size"], max_positions=h["max_position_embeddings"], activation="gated_silu",
        norm_type="rmsnorm", norm_eps=h["rms_norm_eps"], tie_embeddings=bool(h["tie_word_embeddings"]),
        use_bias=bool(h["attention_bias"]), position_embedding="rotary", rope_theta=_rope(h),
        num_kv_heads=h["num_key_value_heads"] or heads,
        head_dim=None if head_dim * heads == h["hidden_size"] else head_dim)
    return _replace(cfg, overrides)


def llama_rules(cfg: DecoderLMConfig, keys: set[str], prefix: str = "model.",
                module_prefix: tuple[str, ...] = ()) -> list:
    """Rules for LLaMA keys ``{prefix}embed_tokens.weight``, ``{prefix}layers.{i}...``,
    ``{prefix}norm.weight`` (+ ``lm_head.weight``, absent or an identical copy when tied)."""
    mp, h, hkv, bias = module_prefix, cfg.num_heads, cfg.num_kv_heads or cfg.num_heads, cfg.use_bias
    embed, lm_head = prefix + "embed_tokens.weight", "lm_head.weight"
    if cfg.tie_embeddings and lm_head in keys:
        rs = [rule(_p(mp, "token_embed/embedding"), (embed, lm_head), _same_as(lm_head))]
    else:
        rs = [rule(_p(mp, "token_embed/embedding"), embed)]
    if not cfg.tie_embeddings:
        rs.append(rule(_p(mp, "lm_head/kernel"), lm_head, linear))
    for i in range(cfg.num_layers):
        t, o = f"{prefix}layers.{i}.", f"layers_{i}"
        a = t + "self_attn."
        for name, stem, heads in (("query", "q_proj", h), ("key", "k_proj", hkv), ("value", "v_proj", hkv)):
            rs.append(rule(_p(mp, f"{o}/attn/{name}/kernel"), a + stem + ".weight", linear_to_heads(heads)))
            if bias:
                rs.append(rule(_p(mp, f"{o}/attn/{name}/bias"), a + stem + ".bias", bias_to_heads(heads)))
        rs.append(rule(_p(mp, f"{o}/attn/out/kernel"), a + "o_proj.weight", linear_from_heads(h)))
        if bias:
            rs.append(rule(_p(mp, f"{o}/attn/out/bias"), a + "o_proj.bias"))
        rs.append(rule(_p(mp, f"{o}/attn_norm/scale"), t + "input_layernorm.weight"))
        rs += _dense(mp, f"{o}/mlp/wi_0", t + "mlp.gate_proj", bias)
        rs += _dense(mp, f"{o}/mlp/wi_1", t + "mlp.up_proj", bias)
        rs += _dense(mp, f"{o}/mlp/wo", t + "mlp.down_proj", bias)
        rs.append(rule(_p(mp, f"{o}/mlp_norm/scale"), t + "post_attention_layernorm.weight"))
    rs.append(rule(_p(mp, "final_norm/scale"), prefix + "norm.weight"))
    return rs


def llama(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
          **overrides) -> Conversion:
    """LlamaForCausalLM checkpoint -> DecoderLM (rotary, RMSNorm, SwiGLU, grouped-query attention)."""
    cfg = llama_config_from_hf(hf, **overrides)
    prefix = "model." if any(k.startswith("model.") for k in keys) else ""
    # the rotary frequency buffer some old checkpoints carry is not a weight
    ignore = (rf"{prefix}layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
    return Conversion(module=DecoderLM(cfg, dtype=dtype, param_dtype=param_dtype), init_args=(_tokens(),),
                      rules=llama_rules(cfg, keys, prefix), ignore=ignore, stack=(((), cfg.num_layers),))


# -------------------------------------------------------------------------------- BERT
def bert_config_from_hf(hf: dict, keys: set[str] = frozenset(), prefix: str = "", **overrides) -> BertConfig:
    h = _with_defaults(hf, "bert")
    if h["position_embedding_type"] != "absolute":
        raise ConversionError(f"BERT position_embedding_type={h['position_embedding_type']!r}: only 'absolute' "
                              "is supported.")
    cfg = BertConfig(
        vocab_size=h["vocab_size"], width=h["hidden_size"], num_layers=h["num_hidden_layers"],
        num_heads=h["num_attention_heads"], mlp_dim=h["intermediate_size"],
        max_positions=h["max_position_embeddings"], type_vocab_size=h["type_vocab_size"],
        activation=_activation(h["hidden_act"], "hidden_act"), norm_eps=h["layer_norm_eps"],
        pooler=(prefix + "pooler.dense.weight") in keys if keys else True,
        cross_attention_every=1 if h["add_cross_attention"] else 0)
    return _replace(cfg, overrides)


def bert_rules(cfg: BertConfig, keys: set[str], prefix: str = "", module_prefix: tuple[str, ...] = ()) -> list:
    """Rules for BERT keys ``{prefix}embeddings.*``, ``{prefix}encoder.layer.{i}...``, ``{prefix}pooler.*``."""
    mp, h = module_prefix, cfg.num_heads
    e = prefix + "embeddings."
    rs = [rule(_p(mp, "word_embed/embedding"), e + "word_embeddings.weight"),
          rule(_p(mp, "position_embed/embedding"), e + "position_embeddings.weight"),
          rule(_p(mp, "type_embed/embedding"), e + "token_type_embeddings.weight")]
    rs += _layer_norm(mp, "embed_norm", e + "LayerNorm.", keys)
    for i in range(cfg.num_layers):
        t, o = f"{prefix}encoder.layer.{i}.", f"layers_{i}"
        s = t + "attention.self."
        rs += _attention(mp, f"{o}/attn", h, s + "query", s + "key", s + "value", t + "attention.output.dense")
        rs += _layer_norm(mp, f"{o}/attn_norm", t + "attention.output.LayerNorm.", keys)
        if cfg.has_cross_attention(i):
            c = t + "crossattention.self."
            rs += _attention(mp, f"{o}/cross_attn", h, c + "query", c + "key", c + "value",
                             t + "crossattention.output.dense")
            rs += _layer_norm(mp, f"{o}/cross_norm", t + "crossattention.output.LayerNorm.", keys)
        rs += _dense(mp, f"{o}/mlp/wi", t + "intermediate.dense")
        rs += _dense(mp, f"{o}/mlp/wo", t + "output.dense")
        rs += _layer_norm(mp, f"{o}/mlp_norm", t + "output.LayerNorm.", keys)
    if cfg.pooler:
        rs += _dense(mp, "pooler", prefix + "pooler.dense")
    return rs


def bert(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
         **overrides) -> Conversion:
    """BertModel checkpoint (or a BertFor* file: its ``cls.*`` heads are skipped) -> BertEncoder."""
    prefix = "bert." if any(k.startswith("bert.") for k in keys) else ""
    cfg = bert_config_from_hf(hf, keys, prefix, **overrides)
    ignore = (rf"{prefix}embeddings\.position_ids", rf"{prefix}embeddings\.token_type_ids", r"cls\..*")
    init_kwargs = {}
    if cfg.any_cross_attention:
        init_kwargs["encoded"] = jax.ShapeDtypeStruct((1, 2, cfg.width), jnp.float32)
    return Conversion(module=BertEncoder(cfg, dtype=dtype, param_dtype=param_dtype), init_args=(_tokens(),),
                      init_kwargs=init_kwargs, rules=bert_rules(cfg, keys, prefix), ignore=ignore,
                      stack=(((), cfg.num_layers),))


# ---------------------------------------------------------------------------------- T5
def t5_config_from_hf(hf: dict, keys: set[str] = frozenset(), **overrides) -> T5Config:
    h = _with_defaults(hf, "t5")
    if h["feed_forward_proj"] not in T5_FFN:
        raise ConversionError(f"T5 feed_forward_proj={h['feed_forward_proj']!r}; supported: {sorted(T5_FFN)}.")
    untied = "lm_head.weight" in keys
    if "scale_decoder_outputs" in h:         # written by transformers >= 5
        scale = bool(h["scale_decoder_outputs"])
    else:                                    # older configs: tie_word_embeddings=False means v1.1 (no scaling)
        scale = h.get("tie_word_embeddings", True) is not False
    cfg = T5Config(
        vocab_size=h["vocab_size"], width=h["d_model"], num_heads=h["num_heads"], head_dim=h["d_kv"],
        mlp_dim=h["d_ff"], num_layers=h["num_layers"], num_decoder_layers=h["num_decoder_layers"],
        num_buckets=h["relative_attention_num_buckets"], max_distance=h["relative_attention_max_distance"],
        norm_eps=h["layer_norm_epsilon"], activation=T5_FFN[h["feed_forward_proj"]], tie_lm_head=not untied,
        scale_decoder_output=scale)
    return _replace(cfg, overrides)


def t5_rules(cfg: T5Config, keys: set[str], prefix: str = "", module_prefix: tuple[str, ...] = ()) -> list:
    """Rules for T5ForConditionalGeneration keys ``{prefix}shared.weight``, ``{prefix}encoder.block.{i}...``."""
    mp, h = module_prefix, cfg.num_heads
    shared = prefix + "shared.weight"
    copies = [k for k in (prefix + "encoder.embed_tokens.weight", prefix + "decoder.embed_tokens.weight")
              if k in keys]
    rs = [rule(_p(mp, "shared/embedding"), (shared, *copies), _tied_source(copies))]
    if not cfg.tie_lm_head:
        rs.append(rule(_p(mp, "lm_head/kernel"), prefix + "lm_head.weight", linear))
    gated = cfg.activation.startswith("gated")
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers)):
        for i in range(n):
            t, o = f"{prefix}{stack}.block.{i}.", f"{stack}/layers_{i}"
            a = t + "layer.0.SelfAttention."
            rs += _attention(mp, f"{o}/attn", h, a + "q", a + "k", a + "v", a + "o", bias=False)
            rs.append(rule(_p(mp, f"{o}/attn_norm/scale"), t + "layer.0.layer_norm.weight"))
            ff = 1
            if stack == "decoder":
                c = t + "layer.1.EncDecAttention."
                rs += _attention(mp, f"{o}/cross_attn", h, c + "q", c + "k", c + "v", c + "o", bias=False)
                rs.append(rule(_p(mp, f"{o}/cross_norm/scale"), t + "layer.1.layer_norm.weight"))
                ff = 2
            f = f"{t}layer.{ff}."
            if gated:
                rs.append(rule(_p(mp, f"{o}/mlp/wi_0/kernel"), f + "DenseReluDense.wi_0.weight", linear))
                rs.append(rule(_p(mp, f"{o}/mlp/wi_1/kernel"), f + "DenseReluDense.wi_1.weight", linear))
            else:
                rs.append(rule(_p(mp, f"{o}/mlp/wi/kernel"), f + "DenseReluDense.wi.weight", linear))
            rs.append(rule(_p(mp, f"{o}/mlp/wo/kernel"), f + "DenseReluDense.wo.weight", linear))
            rs.append(rule(_p(mp, f"{o}/mlp_norm/scale"), f + "layer_norm.weight"))
        rs.append(rule(_p(mp, f"{stack}/relative_bias/embedding"),
                       f"{prefix}{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
        rs.append(rule(_p(mp, f"{stack}/final_norm/scale"), f"{prefix}{stack}.final_layer_norm.weight"))
    return rs


def t5(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
       **overrides) -> Conversion:
    """T5ForConditionalGeneration checkpoint (T5 v1.0 / v1.1 / Flan-T5) -> T5."""
    cfg = t5_config_from_hf(hf, keys, **overrides)
    # An unused cross-attention relative bias some old files carry (HF ignores it too).
    ignore = (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",)
    return Conversion(module=T5(cfg, dtype=dtype, param_dtype=param_dtype), init_args=(_tokens(), _tokens()),
                      rules=t5_rules(cfg, keys), ignore=ignore,
                      stack=((("encoder",), cfg.num_layers), (("decoder",), cfg.decoder_layers)))


CONVERTERS = {
    "GPT2LMHeadModel": gpt2,
    "GPT2Model": gpt2,
    "OPTForCausalLM": opt,
    "OPTModel": opt,
    "LlamaForCausalLM": llama,
    "BertModel": bert,
    "BertForPreTraining": bert,
    "BertForMaskedLM": bert,
    "T5ForConditionalGeneration": t5,
}

