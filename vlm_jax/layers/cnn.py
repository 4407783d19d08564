"""A small convolutional grid encoder (trained from scratch) and adaptive average pooling.

Dimension letters:
  B batch, S image side (pixels), G annotation grid side, C channels, L = G*G locations.

`GridCNN` turns images `[B, S, S, 3]` into a feature grid `[B, G, G, C]` for Show, Attend and
Tell: a stack of (3x3 conv -> GroupNorm -> ReLU) stages, one per entry of `widths`. A stage
downsamples by 2 while its output would still be at least G wide; `adaptive_avg_pool` then
brings the map to exactly G x G (so S=64 gives 64 -> 32 -> 16 -> pool -> 14). GroupNorm keeps
no batch statistics, so the encoder has only `params`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def _pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging weights of adaptive average pooling along one axis.

    Output cell i averages input cells [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)), the
    usual adaptive-pooling bins (every bin is non-empty, also when n_out > n_in).
    """
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        lo = (i * n_in) // n_out
        hi = -(-((i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Adaptive average pooling `[B, H, W, C] -> [B, out_h, out_w, C]` (identity if equal)."""
    if x.ndim != 4:
        raise ValueError(f"adaptive_avg_pool expects a [B, H, W, C] feature map, got shape {x.shape}.")
    h, w = x.shape[1:3]
    oh, ow = out_hw
    if (h, w) == (oh, ow):
        return x
    ph = jnp.asarray(_pool_matrix(h, oh), x.dtype)
    pw = jnp.asarray(_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("gh,bhwc,kw->bgkc", ph, x, pw)


def _num_groups(channels: int, max_groups: int = 8) -> int:
    """Largest divisor of `channels` that is <= max_groups (GroupNorm needs C % groups == 0)."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


class ConvNormReLU(nn.Module):
    """3x3 conv (stride 1 or 2, SAME padding) -> GroupNorm -> ReLU: `[B, H, W, Cin] -> [B, H', W', C]`."""

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features, (3, 3), strides=(self.stride, self.stride), padding="SAME", use_bias=False,
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.he_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")),
            name="conv")(x)
        x = nn.GroupNorm(
            num_groups=_num_groups(self.features), dtype=self.dtype, param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
            name="norm")(x)
        return nn.relu(x)


def grid_sincos_embedding(grid: int, dim: int, *, max_period: float = 10_000.0) -> jax.Array:
    """Fixed 2-D sine-cosine position table f32[grid*grid, dim] for a row-major G x G grid.

    The first half of the channels encodes the row, the second half the column, each as
    [sin(pos * w_k), cos(pos * w_k)] with frequencies w_k = max_period**(-k / (dim/4)),
    k = 0 .. dim/4 - 1 (the transformer encoding of Vaswani et al., one axis per half).
    dim must be divisible by 4."""
    if dim % 4:
        raise ValueError(f"grid_sincos_embedding: dim={dim} must be divisible by 4 "
                         "(sin and cos for each of the two axes).")
    quarter = dim // 4
    freqs = max_period ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)          # [dim/4]
    pos = jnp.arange(grid, dtype=jnp.float32)[:, None] * freqs[None]                   # [G, dim/4]
    axis = jnp.concatenate([jnp.sin(pos), jnp.cos(pos)], axis=-1)                      # [G, dim/2]
    rows = jnp.broadcast_to(axis[:, None, :], (grid, grid, dim // 2))                  # row of cell (r, c)
    cols = jnp.broadcast_to(axis[None, :, :], (grid, grid, dim // 2))                  # column of cell (r, c)
    return jnp.concatenate([rows, cols], axis=-1).reshape(grid * grid, dim)


class GridCNN(nn.Module):
    """Small CNN grid encoder: `images f32[B, S, S, 3] -> features [B, G, G, widths[-1]]`.

    Attributes:
      widths: channels of the stages, one (conv, GroupNorm, ReLU) stage each.
      grid: G, the side of the output grid.
    """

    widths: Sequence[int]
    grid: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"GridCNN expects images [B, S, S, 3], got shape {images.shape}.")
        if not self.widths:
            raise ValueError("GridCNN: model.cnn_widths is empty; give at least one stage width, e.g. (32, 64).")
        if self.grid < 1:
            raise ValueError(f"GridCNN: model.grid={self.grid} must be >= 1.")
        x = images.astype(self.dtype)
        side = images.shape[1]
        for i, width in enumerate(self.widths):
            stride = 2 if math.ceil(side / 2) >= self.grid else 1
            side = math.ceil(side / stride)
            x = ConvNormReLU(width, stride, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"stage{i}")(x)
        return adaptive_avg_pool(x, (self.grid, self.grid))
