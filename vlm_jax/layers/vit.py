"""Vision Transformer: plain ViT, CLIP ViT-B/16 and ViT-L/14, EVA ViT-g/14 (BLIP-2).

Dimension letters: B batch, S image side (pixels), C image channels, p patch side,
P patches ((S/p)^2), D width, H heads, F FFN width, L layers.

One `VisionTransformer(config)` covers the variants; they differ only in `ViTConfig`
fields (see the presets at the bottom):

  ViT (HF ViTModel)       pre-LN blocks, GELU, patch bias, final LN on all tokens,
                          optional dense+tanh pooler on [CLS]
  CLIP vision tower       extra `pre_norm` LN after the embeddings, quick-GELU, no patch
                          bias, final LN only on the pooled [CLS] (``norm_tokens=False``)
  EVA ViT-g/14 (BLIP-2)   1408 wide, FFN 6144, 16 heads, GELU; BLIP-2 drops the last of
                          the 40 blocks (39 here, as HF Blip2VisionConfig), final LN on tokens

Images are NHWC ``[B, S, S, C]``, already normalised (mean/std of the checkpoint).
Tokens are ``[CLS, patch_0 .. patch_{P-1}]`` (row-major patches), ``[B, P+1, D]``.

Parameters: ``patch_embed`` (kernel ``[p, p, C, D]`` ('conv_h','conv_w','conv_in','embed'),
bias ``[D]``), ``cls_token [D]`` ('embed'), ``pos_embed [P+1, D]`` ('positions','embed'; absent
with ``posemb='sincos2d'``, a fixed 2-D sine-cosine code),
``pre_norm`` (CLIP), ``encoder`` (`TransformerStack`: ``layers_i`` or scanned ``layers``),
``final_norm``, ``pooler`` (dense+tanh pool only).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax.numpy as jnp

from vlm_jax.layers.mlp import DEFAULT_KERNEL_INIT, Dense
from vlm_jax.layers.norms import LayerNorm
from vlm_jax.layers.transformer import ACT_AXES, BlockConfig, TransformerStack, check_remat_policy

POOLS = ("cls_norm", "dense_tanh", "none")
POSEMBS = ("learned", "sincos2d")


def sincos2d_posemb(side: int, width: int, temperature: float = 10_000.0):
    """Fixed 2-D sine-cosine position code of a ``side x side`` patch grid -> f32 ``[side*side, width]``,
    row-major like the patches. A quarter of the channels each: sin / cos of the column index and
    sin / cos of the row index, at ``width/4`` frequencies ``temperature^(-i/(width/4))`` (the
    from-scratch ViT of MAE / big_vision). Every entry lies in [-1, 1]; ``width % 4 == 0``."""
    import numpy as np
    if width % 4:
        raise ValueError(f"sincos2d position embeddings need a width divisible by 4; got {width}.")
    quarter = width // 4
    freq = temperature ** (-np.arange(quarter) / quarter)                       # [D/4]
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")   # [side, side] each
    ang_c = cols.reshape(-1, 1) * freq[None]                                     # [P, D/4]
    ang_r = rows.reshape(-1, 1) * freq[None]
    table = np.concatenate([np.sin(ang_c), np.cos(ang_c), np.sin(ang_r), np.cos(ang_r)], axis=1)
    return jnp.asarray(table, jnp.float32)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT hyper-parameters.

    norm_tokens: apply ``final_norm`` to every token of the last layer (ViT, EVA/BLIP-2);
      False keeps the last layer raw (CLIP's ``last_hidden_state``).
    pool: 'cls_norm' -> ``final_norm(last_hidden_state[:, 0])`` (CLIP, BLIP-2);
      'dense_tanh' -> ``tanh(Dense(last_hidden_state[:, 0]))`` (HF ViTModel pooler); 'none'.
    pre_norm: CLIP's LayerNorm on the embeddings before the first block.
    scan_layers: one `nn.scan` over the blocks (params ``encoder/layers`` stacked on a
      leading 'layers' axis) instead of ``encoder/layers_i``.
    remat_policy: see `vlm_jax.layers.transformer.REMAT_POLICIES`.
    posemb: 'learned' (a ``pos_embed [P+1, D]`` parameter: every pretrained tower) or 'sincos2d'
      (a fixed `sincos2d_posemb` of the patch grid, zeros for [CLS], no parameter: for towers
      trained from scratch, whose learned table starts at N(0, 0.02) beside patch embeddings ~10x
      larger and may never grow; the synthetic BLIP-2 variants, README).
    """
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    activation: str = "gelu"
    norm_eps: float = 1e-12
    qkv_bias: bool = True
    patch_bias: bool = True
    pre_norm: bool = False
    norm_tokens: bool = True
    pool: str = "none"
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    scan_layers: bool = False
    remat_policy: str = "none"
    implementation: str | None = None
    posemb: str = "learned"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}.")
        if self.pool not in POOLS:
            raise ValueError(f"ViTConfig.pool={self.pool!r}; use one of {POOLS}.")
        if self.posemb not in POSEMBS:
            raise ValueError(f"ViTConfig.posemb={self.posemb!r}; use one of {POSEMBS}.")
        if self.posemb == "sincos2d" and self.hidden_size % 4:
            raise ValueError(f"ViTConfig.posemb='sincos2d' needs hidden_size divisible by 4; got {self.hidden_size}.")
        check_remat_policy(self.remat_policy, field="ViTConfig.remat_policy")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def block(self) -> BlockConfig:
        return BlockConfig(num_heads=self.num_heads, head_dim=self.hidden_size // self.num_heads,
                           mlp_dim=self.mlp_dim, activation=self.activation, norm_position="pre",
                           norm_type="layernorm", norm_eps=self.norm_eps, attn_bias=self.qkv_bias,
                           dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                           implementation=self.implementation)


@flax.struct.dataclass
class VisionOutput:
    """features: ``[B, P+1, D]`` — ``last_hidden_state`` when ``output_layer == -1``, else the
    raw ``hidden_states[output_layer]``. last_hidden_state / pooled ``[B, D]``: HF semantics,
    None when ``output_layer != -1`` (or no pool). hidden_states: tuple of L+1 ``[B, P+1, D]``
    (embeddings [after pre_norm], then each layer) or None."""
    features: Any
    last_hidden_state: Any = None
    pooled: Any = None
    hidden_states: Any = None


class VisionTransformer(nn.Module):
    """``images [B, S, S, C]`` -> `VisionOutput` (tokens ``[B, P+1, D]``)."""
    config: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images, *, output_layer: int = -1, output_hidden_states: bool = False,
                 deterministic: bool = True, apply_final_norm: bool = True) -> VisionOutput:
        """Args:
          images: ``[B, S, S, C]`` float, S = config.image_size.
          output_layer: which hidden state to return as ``features`` (index into the L+1
            hidden states; -1 = last layer + final norm as HF's last_hidden_state,
            -2 = the penultimate layer's raw output, as BLIP-2/Flamingo use).
          output_hidden_states: also return all L+1 hidden states.
          deterministic: False enables dropout ('dropout' rng).
          apply_final_norm: False returns the last layer's raw output as ``features`` (no
            ``final_norm``), for a model that normalises the features itself (BLIP-2's
            trainable ``ln_vision``).
        """
        c = self.config
        if images.ndim != 4 or images.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(f"VisionTransformer expects images [B, {c.image_size}, {c.image_size}, "
                             f"{c.num_channels}] (NHWC); got {images.shape}. Resize the images or set "
                             "ViTConfig.image_size.")
        d = c.hidden_size
        x = nn.Conv(d, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size), padding="VALID",
                    use_bias=c.patch_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(DEFAULT_KERNEL_INIT,
                                                             ("conv_h", "conv_w", "conv_in", "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                    name="patch_embed")(images.astype(self.dtype))          # [B, S/p, S/p, D]
        b = x.shape[0]
        x = x.reshape(b, -1, d)                                              # [B, P, D]
        cls = self.param("cls_token", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("embed",)),
                         (d,), self.param_dtype)
        if c.posemb == "learned":
            pos = self.param("pos_embed", nn.with_logical_partitioning(DEFAULT_KERNEL_INIT, ("positions", "embed")),
                             (c.num_patches + 1, d), self.param_dtype)
        else:                                                                # fixed: [CLS] gets zeros
            grid = sincos2d_posemb(c.image_size // c.patch_size, d)          # [P, D]
            pos = jnp.concatenate([jnp.zeros((1, d), grid.dtype), grid], axis=0)
        x = jnp.concatenate([jnp.broadcast_to(jnp.asarray(cls, self.dtype), (b, 1, d)), x], axis=1)
        x = x + jnp.asarray(pos, self.dtype)[None]
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        if c.pre_norm:
            x = LayerNorm(c.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="pre_norm")(x)
        x = nn.with_logical_constraint(x, ACT_AXES)

        n = c.num_layers
        if not -(n + 1) <= output_layer <= n:
            raise ValueError(f"output_layer={output_layer} is out of range for {n} layers "
                             f"(hidden states are indexed 0..{n}, or -{n + 1}..-1).")
        want_last = (output_layer % (n + 1)) == n and apply_final_norm
        stack = TransformerStack(c.block, n, scan_layers=c.scan_layers, remat_policy=c.remat_policy, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="encoder")
        h, hidden = stack(x, deterministic=deterministic, output_layer=output_layer,
                          output_hidden_states=output_hidden_states)
        final_norm = LayerNorm(c.norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")
        pooler = (Dense(d, ("embed", "hidden"), dtype=self.dtype, param_dtype=self.param_dtype, name="pooler")
                  if c.pool == "dense_tanh" else None)
        if not want_last:
            if self.is_initializing():   # create the head params even when not used here
                final_norm(h)
                if pooler is not None:
                    pooler(h[:, 0])
            return VisionOutput(features=h, hidden_states=hidden)
        last = final_norm(h) if c.norm_tokens else h
        if c.pool == "cls_norm":
            pooled = final_norm(last[:, 0])
        elif c.pool == "dense_tanh":
            pooled = jnp.tanh(pooler(last[:, 0]))
        else:
            pooled = None
            if not c.norm_tokens and self.is_initializing():
                final_norm(h)
        return VisionOutput(features=last, last_hidden_state=last, pooled=pooled, hidden_states=hidden)


# ------------------------------------------------------------------------------ presets
def vit_b16(**overrides) -> ViTConfig:
    """google/vit-base-patch16-224-in21k shape (HF ViTModel with pooler)."""
    return ViTConfig(**{**dict(pool="dense_tanh"), **overrides})


def clip_vit_b16(**overrides) -> ViTConfig:
    """openai/clip-vit-base-patch16 vision tower."""
    base = dict(image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072,
                activation="quick_gelu", norm_eps=1e-5, patch_bias=False, pre_norm=True, norm_tokens=False,
                pool="cls_norm")
    return ViTConfig(**{**base, **overrides})


def clip_vit_l14(**overrides) -> ViTConfig:
    """openai/clip-vit-large-patch14 vision tower (1024 wide, 24 layers, 16 heads, FFN 4096)."""
    return clip_vit_b16(**{**dict(patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                                  mlp_dim=4096), **overrides})


def eva_vit_g14(**overrides) -> ViTConfig:
    """EVA ViT-g/14 as BLIP-2 uses it (HF Blip2VisionConfig): 1408 wide, 39 of the original
    40 blocks, 16 heads, FFN 6144, patch 14, 224 px (257 tokens), GELU, LN eps 1e-6."""
    base = dict(image_size=224, patch_size=14, hidden_size=1408, num_layers=39, num_heads=16, mlp_dim=6144,
                activation="gelu", norm_eps=1e-6, patch_bias=True, pre_norm=False, norm_tokens=True,
                pool="cls_norm")
    return ViTConfig(**{**base, **overrides})
