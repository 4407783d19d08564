"""HF vision towers -> `vlm_jax.layers.vit.VisionTransformer` / `vlm_jax.layers.resnet.ResNet`.

Architectures (the ``architectures[0]`` of config.json):
  CLIPVisionModel   -> VisionTransformer (CLIP style; keys with or without ``vision_model.``)
  CLIPModel         -> VisionTransformer of its vision tower; the text tower and the
                       projections (``text_model.*``, ``text_projection``, ``visual_projection``,
                       ``logit_scale``) are deliberately skipped
  ViTModel          -> VisionTransformer (ViT style; legacy file names
                       ``encoder.layer.i.attention.attention.query``; pooler if present)
  Blip2VisionModel  -> VisionTransformer (EVA style; fused ``qkv`` split into q/k/v)
  ResNetModel       -> ResNet (params + batch_stats)

Each converter is ``fn(hf_config: dict, keys: set[str], *, dtype, param_dtype, **overrides)
-> Conversion``; ``overrides`` replace `ViTConfig` fields (e.g. ``scan_layers=True``) or
`ResNet` attributes (e.g. ``grid=7``). The ``*_rules`` functions take a key ``prefix`` and
a Flax ``module_prefix`` so composite checkpoints (BLIP-2: ``vision_model.``) reuse them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from vlm_jax.convert.common import (Conversion, ConversionError, bias_to_heads, chunk, conv, identity,
                                    linear, linear_from_heads, linear_to_heads, rule)
from vlm_jax.layers.resnet import RESNET_DEPTHS, ResNet
from vlm_jax.layers.vit import ViTConfig, VisionTransformer

# HF hidden_act -> vlm_jax.layers.mlp activation name
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu",
                  "swish": "silu"}

_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "vit": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                num_channels=3, image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-12,
                qkv_bias=True),
    "blip_2_vision_model": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                                num_attention_heads=16, num_channels=3, image_size=224, patch_size=14,
                                hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True),
    "resnet": dict(num_channels=3, embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                   layer_type="bottleneck", hidden_act="relu", downsample_in_first_stage=False,
                   downsample_in_bottleneck=False),
}


def hf_activation(name: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ConversionError(f"HF hidden_act={name!r} has no vlm_jax equivalent; known: {sorted(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def _with_defaults(hf: dict, model_type: str) -> dict:
    return {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}


def vit_config_from_hf(hf: dict, style: str, *, pool: str | None = None, **overrides) -> ViTConfig:
    """`ViTConfig` from an HF vision config dict. style: 'clip' | 'vit' | 'blip2'."""
    mt = {"clip": "clip_vision_model", "vit": "vit", "blip2": "blip_2_vision_model"}[style]
    h = _with_defaults(hf, mt)
    common = dict(image_size=h["image_size"], patch_size=h["patch_size"], num_channels=h["num_channels"],
                  hidden_size=h["hidden_size"], num_layers=h["num_hidden_layers"],
                  num_heads=h["num_attention_heads"], mlp_dim=h["intermediate_size"],
                  activation=hf_activation(h["hidden_act"]), norm_eps=h["layer_norm_eps"])
    if style == "clip":
        style_kw = dict(qkv_bias=True, patch_bias=False, pre_norm=True, norm_tokens=False, pool="cls_norm")
    elif style == "vit":
        style_kw = dict(qkv_bias=h["qkv_bias"], patch_bias=True, pre_norm=False, norm_tokens=True,
                        pool=pool or "dense_tanh")
    else:
        style_kw = dict(qkv_bias=True, patch_bias=True, pre_norm=False, norm_tokens=True, pool="cls_norm")
    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ConversionError(f"unknown ViTConfig override(s) {bad}; fields are {sorted(fields)}.")
    return ViTConfig(**{**common, **style_kw, **overrides})


_BLOCK_NAMES = {
    "clip": dict(layer="encoder.layers.{i}.", qkv=None, query="self_attn.q_proj", key="self_attn.k_proj",
                 value="self_attn.v_proj", out="self_attn.out_proj", norm1="layer_norm1", norm2="layer_norm2",
                 fc1="mlp.fc1", fc2="mlp.fc2"),
    "vit": dict(layer="encoder.layer.{i}.", qkv=None, query="attention.attention.query",
                key="attention.attention.key", value="attention.attention.value", out="attention.output.dense",
                norm1="layernorm_before", norm2="layernorm_after", fc1="intermediate.dense", fc2="output.dense"),
    "blip2": dict(layer="encoder.layers.{i}.", qkv="self_attn.qkv", out="self_attn.projection",
                  norm1="layer_norm1", norm2="layer_norm2", fc1="mlp.fc1", fc2="mlp.fc2"),
}


def vit_rules(cfg: ViTConfig, style: str, prefix: str = "", module_prefix: tuple[str, ...] = ()) -> list:
    """Rules for a VisionTransformer whose params sit under ``module_prefix``, reading file
    keys that start with ``prefix``. Unrolled layout (``encoder/layers_i``)."""
    nh = cfg.num_heads
    P = lambda s: "/".join(module_prefix + tuple(s.split("/")))  # noqa: E731
    K = lambda s: prefix + s  # noqa: E731
    rs = []
    if style == "clip":
        rs += [rule(P("cls_token"), K("embeddings.class_embedding")),
               rule(P("patch_embed/kernel"), K("embeddings.patch_embedding.weight"), conv),
               rule(P("pos_embed"), K("embeddings.position_embedding.weight")),
               rule(P("pre_norm/scale"), K("pre_layrnorm.weight")),
               rule(P("pre_norm/bias"), K("pre_layrnorm.bias")),
               rule(P("final_norm/scale"), K("post_layernorm.weight")),
               rule(P("final_norm/bias"), K("post_layernorm.bias"))]
    elif style == "vit":
        rs += [rule(P("cls_token"), K("embeddings.cls_token"), lambda x: x.reshape(-1)),
               rule(P("patch_embed/kernel"), K("embeddings.patch_embeddings.projection.weight"), conv),
               rule(P("patch_embed/bias"), K("embeddings.patch_embeddings.projection.bias")),
               rule(P("pos_embed"), K("embeddings.position_embeddings"), lambda x: x[0]),
               rule(P("final_norm/scale"), K("layernorm.weight")),
               rule(P("final_norm/bias"), K("layernorm.bias"))]
        if cfg.pool == "dense_tanh":
            rs += [rule(P("pooler/kernel"), K("pooler.dense.weight"), linear),
                   rule(P("pooler/bias"), K("pooler.dense.bias"))]
    elif style == "blip2":
        rs += [rule(P("cls_token"), K("embeddings.class_embedding"), lambda x: x.reshape(-1)),
               rule(P("patch_embed/kernel"), K("embeddings.patch_embedding.weight"), conv),
               rule(P("patch_embed/bias"), K("embeddings.patch_embedding.bias")),
               rule(P("pos_embed"), K("embeddings.position_embedding"), lambda x: x[0]),
               rule(P("final_norm/scale"), K("post_layernorm.weight")),
               rule(P("final_norm/bias"), K("post_layernorm.bias"))]
    else:
        raise ValueError(f"vit_rules style={style!r}; use 'clip', 'vit' or 'blip2'.")

    # Per-block HF names (after the layer prefix) of each style; one loop maps them all.
    names = _BLOCK_NAMES[style]
    for i in range(cfg.num_layers):
        L, f = f"encoder/layers_{i}", names["layer"].format(i=i)
        for j, ours in enumerate(("query", "key", "value")):
            if names["qkv"] is None:  # separate q/k/v projections
                theirs = f + names[ours]
                rs.append(rule(P(f"{L}/attn/{ours}/kernel"), K(theirs + ".weight"), linear_to_heads(nh)))
                if style != "vit" or cfg.qkv_bias:
                    rs.append(rule(P(f"{L}/attn/{ours}/bias"), K(theirs + ".bias"), bias_to_heads(nh)))
            else:  # EVA / BLIP-2: one fused qkv matrix, q/k/v are its thirds (k bias is zero in the file)
                rs += [rule(P(f"{L}/attn/{ours}/kernel"), K(f + names["qkv"] + ".weight"),
                            chunk(j, 3, 0, linear_to_heads(nh))),
                       rule(P(f"{L}/attn/{ours}/bias"), K(f + names["qkv"] + ".bias"),
                            chunk(j, 3, 0, bias_to_heads(nh)))]
        rs += [rule(P(f"{L}/attn/out/kernel"), K(f + names["out"] + ".weight"), linear_from_heads(nh)),
               rule(P(f"{L}/attn/out/bias"), K(f + names["out"] + ".bias"))]
        for ours, theirs, weight, fn in (("attn_norm", "norm1", "scale", identity),
                                         ("mlp_norm", "norm2", "scale", identity),
                                         ("mlp/wi", "fc1", "kernel", linear), ("mlp/wo", "fc2", "kernel", linear)):
            rs += [rule(P(f"{L}/{ours}/{weight}"), K(f + names[theirs] + ".weight"), fn),
                   rule(P(f"{L}/{ours}/bias"), K(f + names[theirs] + ".bias"))]
    return rs


def _vit_conversion(cfg: ViTConfig, style: str, prefix: str, ignore: tuple, dtype, param_dtype) -> Conversion:
    module = VisionTransformer(cfg, dtype=dtype, param_dtype=param_dtype)
    images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
    return Conversion(module=module, init_args=(images,), rules=vit_rules(cfg, style, prefix),
                      ignore=ignore, stack=((("encoder",), cfg.num_layers),))


def _vision_prefix(keys: set[str]) -> str:
    return "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""


def clip_vision(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                **overrides) -> Conversion:
    """CLIPVisionModel checkpoint -> VisionTransformer (CLIP style)."""
    cfg = vit_config_from_hf(hf, "clip", **overrides)
    prefix = _vision_prefix(keys)
    return _vit_conversion(cfg, "clip", prefix, (rf"{prefix}embeddings\.position_ids",), dtype, param_dtype)


def clip_model_vision(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                      **overrides) -> Conversion:
    """CLIPModel checkpoint -> its vision tower only (text tower and projections skipped)."""
    if "vision_config" not in hf:
        raise ConversionError("CLIPModel config.json has no 'vision_config'.")
    cfg = vit_config_from_hf(hf["vision_config"], "clip", **overrides)
    ignore = (r"text_model\..*", r"text_projection\..*", r"visual_projection\..*", r"logit_scale",
              r"vision_model\.embeddings\.position_ids")
    return _vit_conversion(cfg, "clip", "vision_model.", ignore, dtype, param_dtype)


def vit_model(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
              **overrides) -> Conversion:
    """ViTModel checkpoint -> VisionTransformer (ViT style; pooler iff the file has one)."""
    prefix = ""
    pool = "dense_tanh" if "pooler.dense.weight" in keys else "none"
    overrides.setdefault("pool", pool)
    cfg = vit_config_from_hf(hf, "vit", **overrides)
    return _vit_conversion(cfg, "vit", prefix, (), dtype, param_dtype)


def blip2_vision(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 **overrides) -> Conversion:
    """Blip2VisionModel checkpoint (EVA ViT-g style) -> VisionTransformer."""
    cfg = vit_config_from_hf(hf, "blip2", **overrides)
    return _vit_conversion(cfg, "blip2", _vision_prefix(keys), (), dtype, param_dtype)


# ----------------------------------------------------------------------------- ResNet
def resnet_module_from_hf(hf: dict, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                          **overrides) -> ResNet:
    h = _with_defaults(hf, "resnet")
    if h["hidden_act"] != "relu":
        raise ConversionError(f"ResNet hidden_act={h['hidden_act']!r}: only 'relu' is supported.")
    if h["num_channels"] != 3:
        raise ConversionError(f"ResNet num_channels={h['num_channels']}: only RGB (3) is supported.")
    depths = tuple(h["depths"])
    depth = next((d for d, (kind, ds) in RESNET_DEPTHS.items() if ds == depths and kind == h["layer_type"]), 0)
    kw = dict(depth=depth, embedding_size=h["embedding_size"], hidden_sizes=tuple(h["hidden_sizes"]),
              stage_depths=depths, block_type=h["layer_type"],
              downsample_in_bottleneck=h["downsample_in_bottleneck"],
              downsample_in_first_stage=h["downsample_in_first_stage"], dtype=dtype, param_dtype=param_dtype)
    kw.update(overrides)
    return ResNet(**kw)


def resnet_rules(module: ResNet, prefix: str = "", module_prefix: tuple[str, ...] = ()) -> list:
    """Rules for ResNet params + batch_stats from HF ResNetModel keys."""
    kind, depths, sizes = module.layout()
    rs = []

    def conv_bn(ours_conv, ours_bn, theirs):
        mp = "/".join(module_prefix)
        j = (lambda s: f"{mp}/{s}" if mp else s)
        return [rule(("params",) + tuple(j(f"{ours_conv}/kernel").split("/")), prefix + theirs + "convolution.weight", conv),
                rule(("params",) + tuple(j(f"{ours_bn}/scale").split("/")), prefix + theirs + "normalization.weight"),
                rule(("params",) + tuple(j(f"{ours_bn}/bias").split("/")), prefix + theirs + "normalization.bias"),
                rule(("batch_stats",) + tuple(j(f"{ours_bn}/mean").split("/")),
                     prefix + theirs + "normalization.running_mean"),
                rule(("batch_stats",) + tuple(j(f"{ours_bn}/var").split("/")),
                     prefix + theirs + "normalization.running_var")]

    rs += conv_bn("stem_conv", "stem_bn", "embedder.embedder.")
    in_ch = module.embedding_size
    for i, (n, out) in enumerate(zip(depths, sizes)):
        for b in range(n):
            blk = f"stage_{i}_block_{b}"
            theirs = f"encoder.stages.{i}.layers.{b}."
            n_convs = 3 if kind == "bottleneck" else 2
            for k in range(n_convs):
                rs += conv_bn(f"{blk}/conv_{k}", f"{blk}/bn_{k}", theirs + f"layer.{k}.")
            stride = 2 if (b == 0 and (i > 0 or module.downsample_in_first_stage)) else 1
            if b == 0 and (in_ch != out or stride != 1):
                rs += conv_bn(f"{blk}/shortcut_conv", f"{blk}/shortcut_bn", theirs + "shortcut.")
        in_ch = out
    return rs


def resnet_model(hf: dict, keys: set[str], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 **overrides) -> Conversion:
    """ResNetModel checkpoint -> ResNet (``variables = {'params', 'batch_stats'}``)."""
    module = resnet_module_from_hf(hf, dtype=dtype, param_dtype=param_dtype, **overrides)
    prefix = ""
    images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return Conversion(module=module, init_args=(images,), rules=resnet_rules(module, prefix),
                      ignore=(r".*num_batches_tracked",))


CONVERTERS = {
    "CLIPVisionModel": clip_vision,
    "CLIPModel": clip_model_vision,
    "ViTModel": vit_model,
    "Blip2VisionModel": blip2_vision,
    "ResNetModel": resnet_model,
}
