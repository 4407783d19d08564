"""Captioning evaluation loop shared by every captioning task (SAT now; BLIP-2 / Flamingo later).

The task supplies a jittable `predict(params, model_state, images) -> {'tokens': [B, max_len],
'scores': [B], optional 'alphas': [B, max_len, L]}` (best beam). This module runs it over an
evaluation split in sharded batches, decodes the captions, and writes under
`<workdir>/eval/step_<N>/`:
  results.json   COCO format [{"image_id", "caption"}]
  metrics.json   BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) + attribute precision and
                 attention localization where the split has object annotations
  attention_*.png  paper-style attention figures for the first `eval.num_figures` images
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

import jax
import numpy as np

from vlm_jax import sharding

log = logging.getLogger("vlm_jax")


def _make_predict(predict: Callable, mesh):
    """Jitted (params, model_state, image, image_id, valid) -> replicated predictions + row ids.

    Each process feeds its own rows of the global batch (as `EvalSplit.batches` yields them); the
    ids and validity travel through the same sharding, so after the replicated output every
    process holds every row with its own image id.
    """
    def fn(params, model_state, image, image_id, valid):
        out = dict(predict(params, model_state, image))
        out["image_id"], out["valid"] = image_id, valid
        return out

    return jax.jit(fn, out_shardings=sharding.replicated(mesh))


def run(predict: Callable, params, model_state, *, config, tokenizer, workdir: str, step: int, mesh,
        final: bool = False, cache: dict | None = None, cache_key=None) -> dict[str, float]:
    """`cache` (a dict the caller owns, e.g. one per task) + `cache_key` (its decoding settings)
    reuse the compiled beam search across periodic evaluations instead of recompiling it."""
    from vlm_jax.data import pipeline
    from vlm_jax.evaluation import captioning, localization, plots

    t0 = time.time()
    split = pipeline.load_eval_split(config, tokenizer, config.eval.split)
    key = (cache_key, mesh)
    predict_jit = cache.get(key) if cache is not None else None
    if predict_jit is None:
        predict_jit = _make_predict(predict, mesh)
        if cache is not None:
            cache[key] = predict_jit
    predictions: dict[int, str] = {}
    words: dict[int, list[str]] = {}
    alphas: dict[int, np.ndarray] = {}
    n_done, limit = 0, config.eval.max_examples or None
    for batch in split.batches(config.eval.batch_size):
        local = {k: batch[k] for k in ("image", "image_id", "valid")}
        g = sharding.put_batch(local, mesh)
        out = jax.device_get(predict_jit(params, model_state, g["image"], g["image_id"], g["valid"]))
        valid = np.asarray(out["valid"])
        for row in np.nonzero(valid)[0]:
            image_id = int(out["image_id"][row])
            ids = [int(t) for t in out["tokens"][row]]
            caption = tokenizer.decode(ids)
            predictions[image_id] = caption
            toks = _tokens_until_eos(ids, tokenizer.eos_id)
            words[image_id] = [tokenizer.id_to_word(t) for t in toks]
            if "alphas" in out:
                alphas[image_id] = np.asarray(out["alphas"][row][: len(toks)], np.float32)
        n_done += int(valid.sum())
        if limit and n_done >= limit:
            break
    gen_time = time.time() - t0

    if jax.process_index() != 0:  # every process holds all predictions; process 0 scores and writes
        return {}
    refs = {i: split.references[i] for i in predictions}
    metrics = captioning.caption_metrics(refs, predictions)
    objects = {i: split.objects.get(i, []) for i in predictions}
    if any(objects.values()):
        from vlm_jax.data.synthetic import COLORS, SHAPES
        metrics["attribute_precision"] = captioning.attribute_precision(predictions, objects, COLORS, SHAPES)
        if alphas:
            loc = localization.attention_localization(words, alphas, objects, grid=config.model.grid,
                                                      colors=COLORS, shapes=SHAPES)
            metrics.update(localization_rate=loc.rate, localization_chance=loc.chance_rate,
                           localization_words=loc.num_words)
    metrics["num_images"] = len(predictions)
    metrics["generation_seconds"] = gen_time

    out_dir = os.path.join(workdir, "eval", f"step_{step}")
    os.makedirs(out_dir, exist_ok=True)
    captioning.write_coco_results(os.path.join(out_dir, "results.json"), predictions)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump({"step": step, "split": config.eval.split, **metrics}, f, indent=2)
    for image_id in list(predictions)[: config.eval.num_figures] if alphas else []:
        plots.save_attention_figure(os.path.join(out_dir, f"attention_{image_id}.png"),
                                    split.get_image(image_id), words[image_id], alphas[image_id],
                                    config.model.grid)
    print_table(metrics, step=step, split=config.eval.split, out_dir=out_dir)
    for i in list(predictions)[:3]:
        log.info("image %d: %r  (ref: %r)", i, predictions[i], refs[i][0])
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}


def _tokens_until_eos(ids: list[int], eos_id: int) -> list[int]:
    out = []
    for t in ids:
        out.append(t)
        if t == eos_id:
            break
    return [t for t in out if t > 0]


def print_table(metrics: dict, *, step: int, split: str, out_dir: str) -> None:
    keys = [k for k in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr",
                        "attribute_precision", "localization_rate", "localization_chance") if k in metrics]
    width = max(len(k) for k in keys) if keys else 10
    lines = [f"== evaluation: step {step}, split {split}, {metrics.get('num_images', 0)} images =="]
    for k in keys:
        v = metrics[k]
        lines.append(f"  {k:<{width}}  {'n/a' if v is None else f'{v:.4f}'}")
    lines.append(f"  files: {out_dir}")
    print("\n".join(lines), flush=True)
