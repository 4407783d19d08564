"""Attention localization: does the model look at the object a word names?

Dimension letters: G grid side, L = G*G annotation locations, n generated words.

For every generated word that names a colour or a shape (`captioning.attribute_words`), take
the location of the largest attention weight alpha of the step that produced the word and ask
whether the centre of that grid cell lies inside the box of an object with that attribute.

Conventions:
  * alpha rows are flattened row-major from the G x G grid: location i is the cell
    (row, col) = divmod(i, G), row 0 at the top, whose centre in normalised image
    coordinates is y = (row + 0.5) / G, x = (col + 0.5) / G (the layout of
    `annotations.reshape(B, G*G, D)` of a [B, G, G, D] feature map).
  * boxes are [ymin, xmin, ymax, xmax] in [0, 1] (docs/interfaces.md); the inside test is
    inclusive on both ends.
  * hit boxes: the boxes of the image's objects having the named attribute. If no object of
    the image has it (the word is wrong), the word is still counted, against the boxes of all
    objects: for a wrong word we can only ask whether attention is on some object at all.
    Images without objects (no annotations) are skipped.
  * chance rate: per counted word, the area fraction of the union of its hit boxes (the hit
    probability of a location drawn uniformly over the image), averaged over counted words.
"""
from __future__ import annotations

from typing import Hashable, Mapping, NamedTuple, Sequence

import numpy as np

from vlm_jax.evaluation.captioning import _field, attribute_words

__all__ = ["LocalizationResult", "attention_localization", "cell_centers", "union_area"]


class LocalizationResult(NamedTuple):
    rate: float          # fraction of counted words whose alpha argmax lies in a hit box (NaN if none)
    num_words: int       # counted colour/shape words
    chance_rate: float   # mean union-area fraction of the hit boxes (NaN if none)


def cell_centers(grid: int) -> np.ndarray:
    """f32[L, 2]: (y, x) centre of every grid cell in normalised coordinates, row-major."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return np.stack([(rows + 0.5) / grid, (cols + 0.5) / grid], axis=-1).astype(np.float32)


def union_area(boxes: np.ndarray) -> float:
    """Area of the union of boxes f32[k, 4] ([ymin, xmin, ymax, xmax], clipped to [0, 1])."""
    boxes = np.clip(np.asarray(boxes, np.float64).reshape(-1, 4), 0.0, 1.0)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    if len(boxes) == 0:
        return 0.0
    ys = np.unique(boxes[:, [0, 2]])
    xs = np.unique(boxes[:, [1, 3]])
    yc, xc = (ys[:-1] + ys[1:]) / 2, (xs[:-1] + xs[1:]) / 2      # centres of the elementary cells
    inside = ((boxes[:, None, None, 0] <= yc[None, :, None]) & (yc[None, :, None] <= boxes[:, None, None, 2]) &
              (boxes[:, None, None, 1] <= xc[None, None, :]) & (xc[None, None, :] <= boxes[:, None, None, 3]))
    covered = inside.any(axis=0)                                  # [len(ys)-1, len(xs)-1]
    return float((np.diff(ys)[:, None] * np.diff(xs)[None, :] * covered).sum())


def _boxes(objs: Sequence[Mapping], image_id) -> np.ndarray:
    out = []
    for o in objs:
        if "bbox" not in o:
            raise KeyError(f"objects[{image_id!r}] has an entry without 'bbox': {o!r}.")
        box = np.asarray(o["bbox"], np.float64).reshape(-1)
        if box.shape != (4,):
            raise ValueError(f"objects[{image_id!r}] bbox {o['bbox']!r} must be [ymin, xmin, ymax, xmax].")
        out.append(box)
    return np.stack(out)


def attention_localization(words: Mapping[Hashable, Sequence[str] | str], alphas: Mapping[Hashable, np.ndarray],
                           objects: Mapping[Hashable, Sequence[Mapping]], *, colors: Sequence[str],
                           shapes: Sequence[str], grid: int) -> LocalizationResult:
    """Attention localization rate of colour/shape words (see the module docstring).

    Args:
      words: {image_id: generated words} (a list, or a string split on whitespace); word i
        was produced by the step whose attention is alphas[image_id][i].
      alphas: {image_id: f32[n, L]} with n >= len(words) (extra rows, e.g. after eos, ignored).
      objects: {image_id: [{'color', 'shape', 'bbox'}, ...]} for every image in `words`.
      colors, shapes: attribute vocabularies (`vlm_jax.data.synthetic.COLORS`/`SHAPES`).
      grid: G.
    Returns:
      LocalizationResult(rate, num_words, chance_rate).
    """
    centers = cell_centers(grid)
    hits, chances = [], []
    for image_id, ws in words.items():
        ws = ws.split() if isinstance(ws, str) else list(ws)
        if image_id not in objects or image_id not in alphas:
            raise KeyError(f"attention_localization: image id {image_id!r} needs entries in both alphas and "
                           "objects.")
        objs = objects[image_id]
        if len(objs) == 0:
            continue
        alpha = np.asarray(alphas[image_id])
        if alpha.ndim != 2 or alpha.shape[1] != grid * grid or alpha.shape[0] < len(ws):
            raise ValueError(f"alphas[{image_id!r}] has shape {alpha.shape}; expected [n >= {len(ws)} words, "
                             f"L = grid*grid = {grid * grid}] (check `grid` and that alphas align with words).")
        boxes = _boxes(objs, image_id)
        attrs = {"color": np.array([_field(o, "color", image_id).lower() for o in objs]),
                 "shape": np.array([_field(o, "shape", image_id).lower() for o in objs])}
        for pos, kind, value in attribute_words(ws, colors, shapes):
            match = attrs[kind] == value.lower()
            hit_boxes = boxes[match] if match.any() else boxes
            y, x = centers[int(np.argmax(alpha[pos]))]
            inside = ((hit_boxes[:, 0] <= y) & (y <= hit_boxes[:, 2]) &
                      (hit_boxes[:, 1] <= x) & (x <= hit_boxes[:, 3]))
            hits.append(bool(inside.any()))
            chances.append(union_area(hit_boxes))
    if not hits:
        return LocalizationResult(rate=float("nan"), num_words=0, chance_rate=float("nan"))
    return LocalizationResult(rate=float(np.mean(hits)), num_words=len(hits), chance_rate=float(np.mean(chances)))
