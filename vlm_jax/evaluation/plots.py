"""Paper-style attention figures (Show, Attend and Tell, Fig. 2-3).

Dimension letters: H, W image height and width, G grid side, L = G*G locations.

The first panel shows the image, every following panel the image under the attention map of
one generated word (alpha upsampled bilinearly from G x G to H x W, then smoothed with a
Gaussian), titled with the word. alpha rows are row-major over the grid (as in
`vlm_jax.evaluation.localization`). Rendering uses matplotlib's Agg canvas directly (no pyplot
state, no display needed).
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

__all__ = ["save_attention_figure", "upsample_attention"]


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of f[H, W] with reflect padding."""
    if sigma <= 0:
        return x
    radius = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        xp = np.pad(x, pad, mode="reflect" if x.shape[axis] > radius else "edge")
        x = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), axis, xp)
    return x


def upsample_attention(alpha: np.ndarray, grid: int, height: int, width: int, smooth: float = 0.5) -> np.ndarray:
    """f[L] -> f32[H, W] in [0, 1]: bilinear upsampling of the G x G map (cell centres at
    ((i + 0.5) * H / G)), Gaussian smoothing with sigma = smooth * cell size, max-normalised."""
    a = np.asarray(alpha, np.float64).reshape(grid, grid)
    ys = np.clip((np.arange(height) + 0.5) * grid / height - 0.5, 0, grid - 1)
    xs = np.clip((np.arange(width) + 0.5) * grid / width - 0.5, 0, grid - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, grid - 1), np.minimum(x0 + 1, grid - 1)
    wy, wx = (ys - y0)[:, None], (xs - x0)[None, :]
    up = ((1 - wy) * ((1 - wx) * a[y0][:, x0] + wx * a[y0][:, x1]) +
          wy * ((1 - wx) * a[y1][:, x0] + wx * a[y1][:, x1]))
    up = _gaussian_blur(up, smooth * min(height, width) / grid)
    up = up - up.min()
    peak = up.max()
    return (up / peak if peak > 0 else up).astype(np.float32)


def save_attention_figure(path: str, image: np.ndarray, words: Sequence[str], alphas: np.ndarray, grid: int, *,
                          max_cols: int = 5, panel_inches: float = 2.0, dpi: int = 100, smooth: float = 0.5) -> str:
    """Writes the attention figure of one caption as a PNG.

    Args:
      path: output .png path (parent directories are created).
      image: uint8[H, W, 3] (float images in [0, 1] are accepted too).
      words: the n generated words.
      alphas: f32[n, L] attention of the step that produced each word, L = grid * grid.
      grid: G.
      max_cols: panels per row; rows = ceil((n + 1) / max_cols).
      panel_inches, dpi: every panel is panel_inches x panel_inches at dpi, so the PNG is
        (cols * panel_inches * dpi) x (rows * panel_inches * dpi) pixels.
      smooth: Gaussian sigma in units of one grid cell.
    Returns:
      path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be uint8[H, W, 3]; got shape {image.shape}.")
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    alphas = np.asarray(alphas, np.float32)
    words = list(words)
    if alphas.ndim != 2 or alphas.shape != (len(words), grid * grid):
        raise ValueError(f"alphas must be f32[n_words={len(words)}, L=grid*grid={grid * grid}]; got {alphas.shape}. "
                         "Pass one attention row per word (cut the rows after eos).")
    height, width = image.shape[:2]
    panels = len(words) + 1
    cols = min(panels, max_cols)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(cols * panel_inches, rows * panel_inches), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.25)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i >= panels:
            continue
        ax.imshow(image)
        if i == 0:
            ax.set_title("image", fontsize=9)
            continue
        heat = upsample_attention(alphas[i - 1], grid, height, width, smooth)
        ax.imshow(heat, cmap="gray", alpha=0.7, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(words[i - 1], fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path
