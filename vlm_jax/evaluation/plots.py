"""Paper-style attention figures (Show, Attend and Tell, Fig. 2-3), and training curves.

Dimension letters: H, W image height and width, G grid side, L = G*G locations.

The first panel shows the image, every following panel the image under the attention map of
one generated word (alpha upsampled bilinearly from G x G to H x W, then smoothed with a
Gaussian), titled with the word. alpha rows are row-major over the grid (as in
`vlm_jax.evaluation.localization`). Rendering uses matplotlib's Agg canvas directly (no pyplot
state, no display needed).

Training curves: every run's `<workdir>/metrics.jsonl` (the trainer's log, one JSON object per
logged step) read back and plotted against the step, e.g. hard attention's attention entropy:

    python -m vlm_jax.evaluation.plots --run soft=runs/sat_soft --run hard=runs/sat_hard \
        --metric entropy --hline entropy=5.278 --out runs/entropy.png
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

__all__ = ["read_curve", "save_attention_figure", "save_training_curves", "upsample_attention"]


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


def read_curve(workdir: str, metric: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(steps i64[n], values f64[n]) of `metric` from `<workdir>/metrics.jsonl` rows of `split`.

    A resumed run logs some steps twice; the later row wins. Unreadable lines are skipped and
    counted in the error if nothing is left; a metric no row has names the ones there are."""
    import json
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: --run must name a training workdir (train.py writes "
                                "metrics.jsonl there).")
    points, seen, bad = {}, set(), 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(row, dict) or row.get("split", "train") != split:
                continue
            seen.update(row)
            if metric in row and isinstance(row.get("step"), int) and row[metric] is not None:
                points[row["step"]] = float(row[metric])
    if not points:
        have = sorted(k for k in seen if k not in ("step", "split"))
        raise ValueError(f"{path}: no {split!r} row logs {metric!r} ({bad} unreadable lines); "
                         f"metrics there: {have}.")
    steps = np.asarray(sorted(points), np.int64)
    return steps, np.asarray([points[s] for s in steps], np.float64)


def save_training_curves(path: str, runs: dict, metrics: Sequence[str], *, hlines: dict | None = None,
                         split: str = "train", title: str = "") -> str:
    """One panel per metric, one line per run ({label: workdir}); `hlines` {metric: value} draws a
    dashed reference (e.g. log L, the entropy of uniform attention). Writes a PNG, returns path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = list(metrics)
    if not metrics or not runs:
        raise ValueError("save_training_curves: give at least one run and one metric.")
    fig = Figure(figsize=(5.0 * len(metrics), 3.6), dpi=100)
    FigureCanvasAgg(fig)
    for j, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), j + 1)
        for label, workdir in runs.items():
            steps, values = read_curve(workdir, metric, split)
            ax.plot(steps, values, label=label)
        if hlines and metric in hlines:
            ax.axhline(float(hlines[metric]), color="gray", linestyle="--", label=f"{hlines[metric]:g}")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m vlm_jax.evaluation.plots",
                                 description="Plot logged training metrics of one or more runs against the step.")
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=WORKDIR")
    ap.add_argument("--metric", action="append", required=True)
    ap.add_argument("--hline", action="append", default=[], metavar="METRIC=VALUE")
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    runs, hlines = {}, {}
    for item in args.run:
        label, sep, workdir = item.partition("=")
        if not sep:
            label, workdir = os.path.basename(os.path.normpath(item)), item
        runs[label] = workdir
    for item in args.hline:
        metric, sep, value = item.partition("=")
        try:
            hlines[metric] = float(value)
        except ValueError:
            ap.error(f"--hline {item!r}: give METRIC=NUMBER, e.g. entropy=5.278")
    try:
        print(save_training_curves(args.out, runs, args.metric, hlines=hlines, split=args.split))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
