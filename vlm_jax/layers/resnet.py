"""ResNet (HF ResNetModel layout, v1.5: stride in the 3x3 conv) as a grid encoder.

Dimension letters: B batch, S image side, h/w feature-map side (S/32), C channels of the
last stage (2048 for ResNet-50/101), G output grid side (L = G*G annotations).

`ResNet(depth, grid)` maps ``images [B, S, S, 3]`` (NHWC, normalised) to the last
stage's feature map resized to ``[B, G, G, C]`` — Show, Attend and Tell's annotation grid.
``grid_resize=False`` (or the `feature_map` method) returns the un-resized ``[B, h, w, C]``
map, which equals HF ``ResNetModel(...).last_hidden_state`` (NCHW there).

Stem: 7x7/2 conv + BN + ReLU, 3x3/2 max-pool. Stages: bottleneck blocks (1x1 reduce,
3x3 (carries the stride), 1x1 expand x4; projection shortcut conv+BN where the shape
changes) or basic blocks (two 3x3) for depths 18/34. BatchNorm uses running statistics
when ``train=False`` (frozen encoder) and updates the ``batch_stats`` collection when
``train=True`` (pass ``mutable=['batch_stats']``). Eps 1e-5, momentum 0.9 (torch 0.1).

Parameters: ``stem_conv``, ``stem_bn``, then ``stage_{i}_block_{j}`` holding ``conv_{k}``
(kernel ``[kh, kw, Cin, Cout]`` ('conv_h','conv_w','conv_in','conv_out'), no bias), ``bn_{k}``
(params scale, bias ('norm',); batch_stats mean, var) and, where the shape changes,
``shortcut_conv`` / ``shortcut_bn``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")

# depth -> (block type, blocks per stage)
RESNET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
RESIZE_METHODS = ("avg", "bilinear")


def _conv(features, kernel, stride, dtype, param_dtype, name):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=nn.with_logical_partitioning(
                       nn.initializers.variance_scaling(2.0, "fan_out", "normal"), CONV_AXES),
                   name=name)


def _bn(train, dtype, param_dtype, name):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                        param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                        name=name)


class _Block(nn.Module):
    """Residual block ``[B, h, w, Cin] -> [B, h/stride, w/stride, out]``."""
    out: int
    stride: int
    kind: str          # 'bottleneck' | 'basic'
    downsample_in_bottleneck: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.kind == "bottleneck":
            mid = self.out // 4
            s0, s1 = (self.stride, 1) if self.downsample_in_bottleneck else (1, self.stride)
            specs = [(mid, 1, s0), (mid, 3, s1), (self.out, 1, 1)]
        else:
            specs = [(self.out, 3, self.stride), (self.out, 3, 1)]
        h = x
        for k, (f, ks, s) in enumerate(specs):
            h = _conv(f, ks, s, name=f"conv_{k}", **kw)(h)
            h = _bn(train, name=f"bn_{k}", **kw)(h)
            if k < len(specs) - 1:
                h = nn.relu(h)
        if x.shape[-1] != self.out or self.stride != 1:
            x = _conv(self.out, 1, self.stride, name="shortcut_conv", **kw)(x)
            x = _bn(train, name="shortcut_bn", **kw)(x)
        return nn.relu(h + x)


def adaptive_avg_pool(x, out_h: int, out_w: int):
    """torch ``AdaptiveAvgPool2d`` on NHWC ``[B, h, w, C] -> [B, out_h, out_w, C]``: output cell
    i averages input rows ``floor(i*h/out_h) .. ceil((i+1)*h/out_h)-1`` (works for up- and
    down-sampling)."""
    def weights(n_in, n_out):
        w = np.zeros((n_out, n_in), np.float32)
        for i in range(n_out):
            a = (i * n_in) // n_out
            b = -((-(i + 1) * n_in) // n_out)
            w[i, a:b] = 1.0 / (b - a)
        return jnp.asarray(w)
    wh = weights(x.shape[1], out_h).astype(x.dtype)
    ww = weights(x.shape[2], out_w).astype(x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", wh, x, ww)


class ResNet(nn.Module):
    """``images [B, S, S, 3] -> [B, G, G, C]`` (or the raw ``[B, h, w, C]`` map).

    Attributes:
      depth: 18, 34, 50, 101 or 152 (ignored when ``stage_depths`` is given).
      grid: G. resize: 'avg' (adaptive average pooling) or 'bilinear'.
      embedding_size, hidden_sizes, stage_depths, block_type: the HF ResNetConfig fields
        (defaults: the standard network for ``depth``; tiny tests override them).
      downsample_in_bottleneck, downsample_in_first_stage: HF ResNetConfig flags.
    """
    depth: int = 50
    grid: int = 14
    resize: str = "avg"
    embedding_size: int = 64
    hidden_sizes: tuple[int, ...] | None = None
    stage_depths: tuple[int, ...] | None = None
    block_type: str | None = None
    downsample_in_bottleneck: bool = False
    downsample_in_first_stage: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def layout(self):
        """-> (block type, blocks per stage, channels per stage)."""
        if self.stage_depths is None:
            if self.depth not in RESNET_DEPTHS:
                raise ValueError(f"ResNet depth={self.depth} is not supported; use one of "
                                 f"{sorted(RESNET_DEPTHS)} or give stage_depths/hidden_sizes/block_type.")
            kind, depths = RESNET_DEPTHS[self.depth]
        else:
            depths = tuple(self.stage_depths)
            kind = self.block_type or "bottleneck"
        kind = self.block_type or kind
        if kind not in ("bottleneck", "basic"):
            raise ValueError(f"ResNet block_type={kind!r}; use 'bottleneck' or 'basic'.")
        sizes = self.hidden_sizes
        if sizes is None:
            base = (256, 512, 1024, 2048) if kind == "bottleneck" else (64, 128, 256, 512)
            sizes = base[:len(depths)]
        if len(sizes) != len(depths):
            raise ValueError(f"ResNet hidden_sizes {sizes} and stage_depths {depths} differ in length.")
        return kind, depths, tuple(sizes)

    @nn.compact
    def __call__(self, images, train: bool = False, *, grid_resize: bool = True):
        """images ``[B, S, S, 3]``; train: BatchNorm batch statistics (and updates).
        -> ``[B, G, G, C]``, or ``[B, S/32, S/32, C]`` with ``grid_resize=False``."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"ResNet expects NHWC images [B, S, S, 3]; got {images.shape}.")
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"ResNet resize={self.resize!r}; use one of {RESIZE_METHODS}.")
        kind, depths, sizes = self.layout()
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = images.astype(self.dtype)
        x = _conv(self.embedding_size, 7, 2, name="stem_conv", **kw)(x)
        x = nn.relu(_bn(train, name="stem_bn", **kw)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (n, out) in enumerate(zip(depths, sizes)):
            for j in range(n):
                stride = 2 if (j == 0 and (i > 0 or self.downsample_in_first_stage)) else 1
                x = _Block(out, stride, kind, self.downsample_in_bottleneck, name=f"stage_{i}_block_{j}",
                           **kw)(x, train)
            # channels stay split like the conv kernels' 'conv_out' axis ('activation_mlp' maps to
            # the same mesh axis, 'tensor')
            x = nn.with_logical_constraint(x, ("activation_batch", None, None, "activation_mlp"))
        if not grid_resize:
            return x
        g = self.grid
        if self.resize == "avg":
            return adaptive_avg_pool(x, g, g)
        return jax.image.resize(x, (x.shape[0], g, g, x.shape[-1]), method="bilinear", antialias=False)

    def feature_map(self, images, train: bool = False):
        """The un-resized last-stage map ``[B, S/32, S/32, C]`` (HF last_hidden_state, NHWC)."""
        return self(images, train, grid_resize=False)
