"""The captioning evaluator shared by every captioning task (SAT now; BLIP-2 / Flamingo later).

The task supplies a jittable ``predict(params, model_state, batch) -> {'tokens': i32[B, max_len],
'scores': f32[B], optional 'alphas': f32[B, max_len, L]}`` (best beam; ``batch`` holds the
split's ``input_keys``, e.g. 'image'), the tokenizer that decodes its tokens, and an eval
split (`vlm_jax.data` EvalSplit: references, object annotations, batches with image ids). It
runs over the split through `predict_over_split` and writes under `<workdir>/eval/step_<N>/`:

  results.json     COCO format [{"image_id", "caption"}]
  metrics.json     BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) + attribute precision,
                   the grounded caption metrics (`grounded.grounded_metrics`: binding precision,
                   object recall, exact-set rate, count / order / position accuracy and their
                   counts, keys `grounded_*`) and attention localization where the split has
                   object annotations
  attention_*.png  paper-style attention figures for the first ``num_figures`` images

The attribute vocabularies (colours, shapes, sizes) are the values the split's own object
annotations use, so nothing here knows which dataset it scores.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

import jax
import numpy as np

from vlm_jax.evaluation import evaluator as ev_lib

log = logging.getLogger("vlm_jax")


class CaptionEvaluator(ev_lib.Evaluator):
    """Captioning metrics + attention figures on one split.

    Args:
      name: evaluator name (files and logged keys).
      every: period in steps during training (0 = final only).
      predict: see the module docstring. input_keys: batch keys ``predict`` reads.
      load_split: () -> EvalSplit (called at each run; the data package caches it).
      tokenizer: decodes ``tokens`` (``decode``, ``eos_id``, ``id_to_word``).
      batch_size: GLOBAL eval batch. max_examples: 0 = the whole split.
      num_figures: attention PNGs per run (needs 'alphas'). grid: attention grid side G.
      mesh: the device mesh. meteor: compute METEOR (`captioning.caption_metrics`).
    """

    def __init__(self, *, name: str, every: int, predict: Callable, input_keys, load_split: Callable,
                 tokenizer, batch_size: int, max_examples: int, num_figures: int, grid: int, mesh,
                 meteor: bool = True):
        self.name, self.every = name, int(every)
        self._predict = ev_lib.make_predict_fn(predict, mesh, input_keys)   # compiled once, reused
        self._load_split, self._tokenizer = load_split, tokenizer
        self._batch_size, self._max_examples = int(batch_size), int(max_examples)
        self._num_figures, self._grid, self._meteor = int(num_figures), int(grid), bool(meteor)

    def run(self, params, model_state, *, step: int, workdir: str, final: bool) -> dict[str, float]:
        from vlm_jax.evaluation import captioning, plots

        t0 = time.time()
        split = self._load_split()
        tok = self._tokenizer
        rows = ev_lib.predict_over_split(self._predict, params, model_state, split.batches(self._batch_size),
                                         limit=self._max_examples or None)
        predictions: dict[int, str] = {}
        words: dict[int, list[str]] = {}
        alphas: dict[int, np.ndarray] = {}
        for image_id, out in rows.items():
            ids = [int(t) for t in out["tokens"]]
            predictions[image_id] = tok.decode(ids)
            toks = _tokens_until_eos(ids, tok.eos_id)
            words[image_id] = [tok.id_to_word(t) for t in toks]
            if "alphas" in out:
                alphas[image_id] = np.asarray(out["alphas"][: len(toks)], np.float32)
        gen_time = time.time() - t0

        if jax.process_index() != 0:  # every process holds all predictions; process 0 scores and writes
            return {}
        refs = {i: split.references[i] for i in predictions}
        metrics = score_captions(predictions, split, words=words, alphas=alphas, grid=self._grid,
                                 meteor=self._meteor)
        metrics["generation_seconds"] = gen_time

        out_dir = ev_lib.eval_dir(workdir, step)
        if self.name != "caption":     # a second caption evaluator (e.g. a blind baseline) gets its own folder
            out_dir = os.path.join(out_dir, self.name)
            os.makedirs(out_dir, exist_ok=True)
        captioning.write_coco_results(os.path.join(out_dir, "results.json"), predictions)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({"step": step, "split": split.split, "evaluator": self.name, **metrics}, f, indent=2)
        for image_id in list(predictions)[: self._num_figures] if alphas else []:
            plots.save_attention_figure(os.path.join(out_dir, f"attention_{image_id}.png"),
                                        split.get_image(image_id), words[image_id], alphas[image_id], self._grid)
        print_table(metrics, step=step, split=split.split, out_dir=out_dir)
        for i in list(predictions)[:3]:
            log.info("image %d: %r  (ref: %r)", i, predictions[i], refs[i][0])
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}


def score_captions(predictions: dict[int, str], split, *, words: dict[int, list[str]] | None = None,
                   alphas: dict[int, np.ndarray] | None = None, grid: int = 1,
                   meteor: bool = True) -> dict[str, float]:
    """The caption metrics of ``predictions {image id: caption}`` against an eval split (its
    references; where it has object annotations also attribute precision and the grounded
    metrics; with per-word ``alphas`` f32[n_words, G*G] and their ``words``, attention
    localization) + ``num_images``. Shared by every evaluator that scores captions."""
    from vlm_jax.evaluation import captioning, grounded, localization
    refs = {i: split.references[i] for i in predictions}
    metrics = captioning.caption_metrics(refs, predictions, meteor=meteor)
    objects = {i: split.objects.get(i, []) for i in predictions}
    if any(objects.values()):
        colors, shapes = attribute_vocabularies(split.objects.values())
        metrics["attribute_precision"] = captioning.attribute_precision(predictions, objects, colors, shapes)
        metrics.update(grounded.grounded_metrics(
            predictions, objects, grounded.GroundedVocabulary.from_objects(split.objects.values())))
        if alphas:
            loc = localization.attention_localization(words, alphas, objects, grid=grid, colors=colors, shapes=shapes)
            metrics.update(localization_rate=loc.rate, localization_chance=loc.chance_rate,
                           localization_words=loc.num_words)
    metrics["num_images"] = len(predictions)
    return metrics


def attribute_vocabularies(objects_per_image) -> tuple[list[str], list[str]]:
    """(colours, shapes) used by a split's object annotations, sorted."""
    colors, shapes = set(), set()
    for objs in objects_per_image:
        for o in objs:
            colors.add(str(o["color"]).lower())
            shapes.add(str(o["shape"]).lower())
    return sorted(colors), sorted(shapes)


def _tokens_until_eos(ids: list[int], eos_id: int) -> list[int]:
    out = []
    for t in ids:
        out.append(t)
        if t == eos_id:
            break
    return [t for t in out if t > 0]


def print_table(metrics: dict, *, step: int, split: str, out_dir: str) -> None:
    keys = [k for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr",
                        "attribute_precision", "grounded_binding_precision", "grounded_binding_precision_with_size",
                        "grounded_object_recall", "grounded_exact_set_rate", "grounded_count_accuracy",
                        "grounded_order_accuracy_horizontal", "grounded_order_accuracy_vertical",
                        "grounded_position_accuracy", "localization_rate", "localization_chance") if k in metrics]
    width = max(len(k) for k in keys) if keys else 10
    lines = [f"== evaluation: step {step}, split {split}, {metrics.get('num_images', 0)} images =="]
    for k in keys:
        v = metrics[k]
        lines.append(f"  {k:<{width}}  {'n/a' if v is None else f'{v:.4f}'}")
    lines.append(f"  files: {out_dir}")
    print("\n".join(lines), flush=True)
