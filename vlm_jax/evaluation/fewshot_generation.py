"""Few-shot open-ended generation with Flamingo: captioning and VQA from interleaved prompts.

Dimension letters: Q queries, B queries per generation call, K shots (demonstrations), M media
per prompt (K + 1, or 1 at 0 shots), S image side, Tp prompt tokens, L generated tokens.

The protocol (Flamingo's section 3 / open_flamingo's ``evaluate_captioning`` / ``evaluate_vqa``):

  1. Items. A *query* is an image of the eval split (captioning) or one of its questions (VQA);
     the *support set* is the first ``support_size`` images (captioning: each with its first --
     or, ``demo_caption='shortest'``, its shortest -- reference caption) or questions (VQA: each with its first answer) of the support split
     (the training split), as open_flamingo draws demonstrations from the training set.
  2. Demonstrations per query: 'random' (K distinct support items, uniform, per query and trial)
     or 'rices' (the K support items whose image features are most similar to the query image's,
     the most similar last: `fewshot.select_demonstrations`). 0 shots is open_flamingo's: two
     random demonstrations with their images removed, then the query with its image.
  3. Prompt (`generation_prompt`): each demonstration ``<image>{filled template}<|endofchunk|>``,
     then ``<image>{template up to the answer slot}`` for the query, e.g. captioning (template
     ``"Output:{}"``)::

         <bos> <image> Output: a red circle <eoc> <image> Output: two blue squares <eoc> <image> Output:

     and VQA (template ``"Question:{} Short answer:{}"``)::

         <bos> <image> Question: what color is the circle? Short answer: red <eoc> <image> Question: ... Short answer:

     media slot m holds the image of the m-th ``<image>``.
  4. Generation: prompts left padded into one batch (positions from the mask), images encoded once
     into latents, beam search (``beam_size``; greedy at 1) through the shared decoding until
     ``<|endofchunk|>`` or ``max_len`` tokens; the text before ``<|endofchunk|>`` is the answer.
  5. Scoring: captions with the project's caption metrics (`caption_eval.score_captions`: BLEU,
     METEOR, ROUGE-L, CIDEr, and the grounded metrics where the split has object annotations),
     answers with the VQAv2 accuracy (`vqa.vqa_scores`, per question type), per trial; reported
     as mean and population std over trials for every shot count and selection method.

`FewShotGenerationEvaluator` writes ``fewshot_generation.json`` (every trial's scores), the
predictions of the last trial of every (selection, shots) and ``shot_curve.png`` (the headline
metric vs shots) under ``<workdir>/eval/step_<N>/<name>/``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from vlm_jax.data.interleaved import Chunk, encode_interleaved
from vlm_jax.evaluation import evaluator as ev_lib
from vlm_jax.evaluation import fewshot

log = logging.getLogger("vlm_jax")

__all__ = ["KINDS", "CAPTION_TEMPLATE", "VQA_TEMPLATE", "GenerationItem", "support_items", "query_items",
           "generation_prompt", "FewShotGenerationEvaluator"]

KINDS = ("caption", "vqa")
#: open_flamingo's prompts (the answer slot is the last "{}").
CAPTION_TEMPLATE = "Output:{}"
VQA_TEMPLATE = "Question:{} Short answer:{}"
HEADLINE = {"caption": "CIDEr", "vqa": "accuracy"}


@dataclasses.dataclass(frozen=True)
class GenerationItem:
    """One support item or query: ``key`` (image id for captions, question id for VQA), the
    ``image_id`` it shows, the ``question`` (VQA; '' for captions) and the ``answer`` a
    demonstration shows (its first reference caption / answer; unused for queries)."""
    key: int
    image_id: int
    question: str
    answer: str


DEMO_CAPTIONS = ("first", "shortest")


def support_items(split, kind: str, size: int, *, demo_caption: str = "first") -> list[GenerationItem]:
    """The first ``size`` items of ``split`` (an `EvalSplit`): images with one reference caption
    ('caption': the ``demo_caption`` one, 'first' as open_flamingo, or 'shortest' in words, so
    that more demonstrations fit a short context) or questions with their first answer ('vqa')."""
    if kind == "caption":
        if demo_caption not in DEMO_CAPTIONS:
            raise ValueError(f"support_items: demo_caption={demo_caption!r}; use one of {DEMO_CAPTIONS}.")
        ids = [int(i) for i in split.image_ids[:size]]
        pick = (lambda refs: refs[0]) if demo_caption == "first" else (
            lambda refs: min(refs, key=lambda r: len(r.split())))
        return [GenerationItem(i, i, "", pick(split.references[i])) for i in ids]
    table = split.question_table()
    return [GenerationItem(q, t["image_id"], t["question"], t["answers"][0]) for q, t in list(table.items())[:size]]


def query_items(split, kind: str, num: int) -> list[GenerationItem]:
    """The first ``num`` images ('caption') or questions ('vqa') of ``split`` (num <= 0: all)."""
    if kind == "caption":
        ids = [int(i) for i in split.image_ids]
        ids = ids[:num] if num > 0 else ids
        return [GenerationItem(i, i, "", "") for i in ids]
    table = list(split.question_table().items())
    table = table[:num] if num > 0 else table
    return [GenerationItem(q, t["image_id"], t["question"], "") for q, t in table]


def _fill(template: str, kind: str, item: GenerationItem, *, answer: bool) -> str:
    """The template filled for ``item``; ``answer=False`` cuts it before the answer slot."""
    head, _, tail = template.rpartition("{}")
    if kind == "vqa":
        if "{}" not in head:
            raise ValueError(f"few-shot VQA template {template!r} needs two '{{}}' (question, answer).")
        head = head.replace("{}", item.question, 1)
    return head + (item.answer + tail if answer else "")


def generation_prompt(kind: str, template: str, demos: Sequence[GenerationItem], query: GenerationItem, tokenizer,
                      *, image_id: int, eoc_id: int, text_only_demos: bool = False) -> list[int]:
    """Token ids of the prompt (module docstring, step 3); ``text_only_demos``: the
    demonstrations lose their ``<image>`` markers (open_flamingo's 0-shot)."""
    if "{}" not in template:
        raise ValueError(f"few-shot {kind} template {template!r} has no '{{}}' for the answer.")
    chunks = [Chunk(_fill(template, kind, d, answer=True), image=not text_only_demos) for d in demos]
    chunks.append(Chunk(_fill(template, kind, query, answer=False), end=False))
    return encode_interleaved(tokenizer, chunks, image_id=image_id, eoc_id=eoc_id)


@functools.lru_cache(maxsize=None)
def _generator(model, beam_size: int, max_len: int, length_penalty: float, eoc_id: int, pad_id: int, mesh):
    """Jitted ``(params, images [B, M, S, S, 3], media_valid [B, M], prompt [B, Tp], mask [B, Tp])
    -> tokens i32[B, max_len]`` (best beam)."""
    from vlm_jax import generate as gen

    def run(params, images, media_valid, prompt, mask):
        latents = model.apply({"params": params}, images, method="encode_images")         # [B, M, R, D]
        res = gen.generate(model, params, prompt, prompt_mask=mask, max_new_tokens=max_len, eos_id=eoc_id,
                           pad_id=pad_id, strategy="beam" if beam_size > 1 else "greedy", beam_size=beam_size,
                           length_penalty=length_penalty, prefill_inputs={"latents": latents},
                           row_inputs={"media_valid": media_valid})      # media keys/values projected once
        return res.tokens[:, 0]
    return fewshot.replicated_jit(run, mesh)


class FewShotGenerationEvaluator(ev_lib.Evaluator):
    """Caption or VQA score vs number of shots, per demonstration-selection method, over trials.

    Args:
      name, every: see `Evaluator`. kind: 'caption' | 'vqa'. model: a `Flamingo` module;
      tokenizer: its tokenizer (``decode``, ``pad_id``); image_id, eoc_id: ``<image>`` /
      ``<|endofchunk|>``.
      load_split: () -> the query `EvalSplit`; load_support: () -> the support `EvalSplit`.
      template: the demonstration text with the answer slot last (default `CAPTION_TEMPLATE` /
        `VQA_TEMPLATE`). shots, trials, selection: as `FewShotClassificationEvaluator`.
      num_queries: queries per trial (<= 0: the whole split). support_size: support items.
      demo_caption: which reference a caption demonstration shows ('first' | 'shortest').
      meteor: caption scorings compute METEOR (`captioning.caption_metrics`).
      beam_size, max_len, length_penalty: decoding. batch_size: queries per generation call.
      vision_features: RICES features ``(params, images) -> f32[n, D]`` (default
        `fewshot.default_vision_features`). mesh: optional device mesh. seed: base seed.

    Metrics: ``{selection}/shots_{K}/{metric}_mean`` and ``_std`` for the caption metrics (BLEU-4,
    CIDEr and the grounded ones where the split has objects) or the VQA accuracies (overall and
    per question type), and ``.../examples_per_s``.
    """

    def __init__(self, *, name: str, every: int, kind: str, model, tokenizer, image_id: int, eoc_id: int,
                 load_split: Callable, load_support: Callable, template: str = "", shots: Sequence[int] = (0, 4, 8),
                 trials: int = 3, selection: str | Sequence[str] = "random", num_queries: int = 100,
                 support_size: int = 256, beam_size: int = 3, max_len: int = 20, length_penalty: float = 0.0,
                 batch_size: int = 16, vision_features: Callable | None = None, mesh=None, seed: int = 0,
                 feature_batch_size: int = 64, demo_caption: str = "first", meteor: bool = True):
        if kind not in KINDS:
            raise ValueError(f"{name}: kind={kind!r}; use one of {KINDS}.")
        self.name, self.every, self.kind = name, int(every), kind
        self._model, self._tok = model, tokenizer
        self._image_id, self._eoc_id = int(image_id), int(eoc_id)
        self._load_split, self._load_support = load_split, load_support
        self._template = template or (CAPTION_TEMPLATE if kind == "caption" else VQA_TEMPLATE)
        need = 1 if kind == "caption" else 2
        if self._template.count("{}") != need:
            raise ValueError(f"{name}: template {self._template!r} must have {need} '{{}}' "
                             f"({'the caption' if need == 1 else 'the question, then the answer'}).")
        self._shots = tuple(int(k) for k in shots)
        self._selections = (selection,) if isinstance(selection, str) else tuple(selection)
        bad = [s for s in self._selections if s not in fewshot.SELECTIONS]
        if bad or not self._selections:
            raise ValueError(f"{name}: selection={selection!r}; use any of {fewshot.SELECTIONS}.")
        if not self._shots or min(self._shots) < 0:
            raise ValueError(f"{name}: shots={tuple(shots)} must be non-empty and >= 0.")
        if max(self._shots) > int(support_size):
            raise ValueError(f"{name}: {max(self._shots)} shots asked from a support set of {support_size}; "
                             "raise support_size or use fewer shots.")
        if min(int(trials), int(beam_size), int(max_len), int(batch_size)) < 1:
            raise ValueError(f"{name}: trials={trials}, beam_size={beam_size}, max_len={max_len} and "
                             f"batch_size={batch_size} must be positive.")
        self._trials, self._num, self._support_size = int(trials), int(num_queries), int(support_size)
        self._beam, self._max_len, self._lp = int(beam_size), int(max_len), float(length_penalty)
        self._bs, self._vision_features, self._mesh = int(batch_size), vision_features, mesh
        self._seed, self._feat_bs, self._meteor = int(seed), int(feature_batch_size), bool(meteor)
        if demo_caption not in DEMO_CAPTIONS:
            raise ValueError(f"{name}: demo_caption={demo_caption!r}; use one of {DEMO_CAPTIONS}.")
        self._demo_caption = demo_caption

    # ---------------------------------------------------------------------------------
    def _features(self, params, split, image_ids) -> np.ndarray:
        if self._vision_features is None:
            self._vision_features = fewshot.default_vision_features(self._model)
        images = _images(split, image_ids)
        return fewshot.batched_features(self._vision_features, params, images, self._feat_bs)

    def _demos(self, k: int, sel: str, rng, n_support: int, sims_row) -> tuple[np.ndarray, bool]:
        """(support indices in prompt order, text_only) for one query."""
        if k == 0:
            return fewshot.select_demonstrations(np.zeros((n_support, 1)), None,
                                                 min(fewshot.ZERO_SHOT_TEXT_DEMOS, n_support), method="random",
                                                 rng=rng), True
        if sel == "random":
            return fewshot.select_demonstrations(np.zeros((n_support, 1)), None, k, method="random", rng=rng), False
        support_feats, query_feat = sims_row
        return fewshot.select_demonstrations(support_feats, query_feat, k, method="rices"), False

    def _generate(self, params, prompts: list[list[int]], media: list[list[np.ndarray]], length: int) -> list[str]:
        """Answers (text before <|endofchunk|>) of the prompts, ``length`` = padded prompt length."""
        tok = self._tok
        gen = _generator(self._model, self._beam, self._max_len, self._lp, self._eoc_id, int(tok.pad_id), self._mesh)
        m = max(len(x) for x in media)
        side = media[0][0].shape
        out = []
        bs = max(1, min(self._bs, len(prompts)))
        for start in range(0, len(prompts), bs):
            rows = np.minimum(np.arange(start, start + bs), len(prompts) - 1)   # the last batch repeats a row
            tokens = np.full((bs, length), tok.pad_id, np.int32)
            mask = np.zeros((bs, length), bool)
            images = np.zeros((bs, m) + side, np.float32)
            valid = np.zeros((bs, m), bool)
            for r, i in enumerate(rows):
                p = prompts[i]
                tokens[r, length - len(p):] = p
                mask[r, length - len(p):] = True
                images[r, :len(media[i])] = np.stack(media[i])
                valid[r, :len(media[i])] = True
            res = np.asarray(jax.device_get(gen(params, images, valid, tokens, mask)))
            for r in range(min(bs, len(prompts) - start)):
                ids = []
                for t in res[r].tolist():
                    if t in (self._eoc_id, tok.eos_id):
                        break
                    if t != tok.pad_id and t < self._image_id:      # the LM's own words only
                        ids.append(int(t))
                out.append(tok.decode(ids).strip())
        return out

    def _render(self, ids: Sequence[int]) -> str:
        """A prompt as text: the markers spelled out, the words decoded (for the results file)."""
        out, words = [], []
        for t in list(ids) + [None]:
            if t in (self._image_id, self._eoc_id, None):
                if words:
                    out.append(self._tok.decode(words).strip())
                    words = []
                if t is not None:
                    out.append("<image>" if t == self._image_id else "<|endofchunk|>")
            else:
                words.append(int(t))
        return " ".join(out)

    def _score(self, split, queries, answers: list[str]) -> dict[str, float]:
        if self.kind == "caption":
            from vlm_jax.evaluation.caption_eval import score_captions
            return score_captions({q.key: a for q, a in zip(queries, answers)}, split, meteor=self._meteor)
        from vlm_jax.evaluation.vqa import vqa_scores
        table = split.question_table()
        return vqa_scores({q.key: a for q, a in zip(queries, answers)}, {q.key: table[q.key] for q in queries})

    def run(self, params, model_state, *, step: int, workdir: str, final: bool) -> dict[str, float]:
        del model_state, final
        t_start = time.time()
        split, support_split = self._load_split(), self._load_support()
        queries = query_items(split, self.kind, self._num)
        support = support_items(support_split, self.kind, self._support_size, demo_caption=self._demo_caption)
        if not queries:
            raise ValueError(f"{self.name}: the {split.name} {split.split} split has no "
                             f"{'images' if self.kind == 'caption' else 'questions'} to query.")
        if len(support) < max(self._shots):
            raise ValueError(f"{self.name}: {max(self._shots)} shots asked but the {support_split.name} "
                             f"{support_split.split} split gives only {len(support)} support items.")
        q_images = {i: img for i, img in zip(*_unique_images(split, [q.image_id for q in queries]))}
        s_images = {i: img for i, img in zip(*_unique_images(support_split, [s.image_id for s in support]))}
        rices = None
        if "rices" in self._selections and any(k > 0 for k in self._shots):
            sf = self._features(params, support_split, [s.image_id for s in support])           # [N, D]
            qf = self._features(params, split, [q.image_id for q in queries])                   # [Q, D]
            rices = (sf, qf)
        lm = self._model.config.lm
        scorer = jax.process_index() == 0
        results: dict[str, dict[str, Any]] = {}
        metrics: dict[str, float] = {}
        for si, sel in enumerate(self._selections):
            results[sel] = {}
            for k in self._shots:
                if k == 0 and si > 0:        # 0 shots does not depend on the selection: reuse the first one's
                    first = self._selections[0]
                    results[sel]["0"] = results[first]["0"]
                    metrics.update({key.replace(f"{first}/shots_0/", f"{sel}/shots_0/", 1): v
                                    for key, v in list(metrics.items()) if key.startswith(f"{first}/shots_0/")})
                    continue
                per_trial_prompts = []
                for trial in range(self._trials):
                    rng = np.random.default_rng([self._seed, trial, k, si + 1 if k else 0, 11])
                    prompts, media = [], []
                    for qi, q in enumerate(queries):
                        demos, text_only = self._demos(k, sel, rng, len(support),
                                                       None if rices is None else (rices[0], rices[1][qi]))
                        items = [support[int(d)] for d in demos]
                        prompts.append(generation_prompt(self.kind, self._template, items, q, self._tok,
                                                         image_id=self._image_id, eoc_id=self._eoc_id,
                                                         text_only_demos=text_only))
                        media.append(([] if text_only else [s_images[d.image_id] for d in items])
                                     + [q_images[q.image_id]])
                    per_trial_prompts.append((prompts, media))
                # one padded length for every trial (a multiple of 8 where the positions allow): only
                # the first trial compiles
                longest = max(len(p) for ps, _ in per_trial_prompts for p in ps)
                length = fewshot.round_up(longest, 8)
                if getattr(lm, "position_embedding", "learned") == "learned":
                    if longest + self._max_len > lm.max_positions:
                        raise ValueError(f"{self.name}: {k}-shot prompts of up to {longest} tokens + {self._max_len} "
                                         f"generated exceed the LM's max_positions={lm.max_positions}; use fewer "
                                         "shots, a shorter max_len or shorter demonstrations.")
                    length = min(length, lm.max_positions - self._max_len)
                trials, seconds = [], []
                for prompts, media in per_trial_prompts:
                    t0 = time.perf_counter()
                    answers = self._generate(params, prompts, media, length)
                    seconds.append(time.perf_counter() - t0)
                    # every process generates (the decode is sharded); process 0 alone scores (Java
                    # METEOR / PTB tokenizer) and writes, as the caption evaluator
                    trials.append(dict(scores=self._score(split, queries, answers) if scorer else {},
                                       predictions={int(q.key): a for q, a in zip(queries, answers)}))
                timed = slice(1, None) if len(seconds) > 1 else slice(None)
                eps = len(queries) * len(seconds[timed]) / max(sum(seconds[timed]), 1e-9)
                keys = [key for key, v in trials[0]["scores"].items() if isinstance(v, (int, float))
                        and not key.startswith("num_") and key != "generation_seconds"]
                summary = {"examples_per_s": eps, "seconds": seconds,
                           "scores": [t["scores"] for t in trials]}
                for key in keys:
                    vals = np.asarray([t["scores"][key] for t in trials if t["scores"].get(key) is not None],
                                      np.float64)
                    if not len(vals):
                        continue
                    summary[f"{key}_mean"], summary[f"{key}_std"] = float(vals.mean()), float(vals.std())
                    metrics[f"{sel}/shots_{k}/{key}_mean"] = float(vals.mean())
                    metrics[f"{sel}/shots_{k}/{key}_std"] = float(vals.std())
                metrics[f"{sel}/shots_{k}/examples_per_s"] = eps
                summary["last_trial_predictions"] = trials[-1]["predictions"]
                summary["example_prompt"] = self._render(per_trial_prompts[-1][0][0])
                results[sel][str(k)] = summary
        head = HEADLINE[self.kind]
        log.info("%s: %s (%.1fs)", self.name,
                 {key: round(v, 4) for key, v in metrics.items() if key.endswith(f"/{head}_mean")},
                 time.time() - t_start)
        if jax.process_index() == 0:
            out_dir = os.path.join(ev_lib.eval_dir(workdir, step), self.name)
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "fewshot_generation.json"), "w") as f:
                json.dump(dict(step=int(step), kind=self.kind, template=self._template, shots=list(self._shots),
                               selections=list(self._selections), trials=self._trials, num_queries=len(queries),
                               support_size=len(support), beam_size=self._beam, max_len=self._max_len,
                               results=results, metrics=metrics), f, indent=2)
            curve = {sel: {str(k): dict(accuracy_mean=results[sel][str(k)].get(f"{head}_mean", float("nan")),
                                        accuracy_std=results[sel][str(k)].get(f"{head}_std", 0.0))
                           for k in self._shots} for sel in self._selections}
            fewshot.save_shot_curve(os.path.join(out_dir, "shot_curve.png"), self._shots, curve, None,
                                    title=f"{self.name} (step {step}, {self._trials} trials)", ylabel=head)
            lines = [f"== {self.name}: step {step}, {split.name} {split.split}, {len(queries)} queries, "
                     f"{self._trials} trials =="]
            for sel in self._selections:
                cells = [f"{k}: {results[sel][str(k)].get(f'{head}_mean', float('nan')):.3f}"
                         f"±{results[sel][str(k)].get(f'{head}_std', 0.0):.3f}" for k in self._shots]
                lines.append(f"  {sel:<7} {head} by shots  " + "  ".join(cells))
            lines.append(f"  files: {out_dir}")
            print("\n".join(lines), flush=True)
        return metrics if scorer else {}


def _unique_images(split, image_ids) -> tuple[list[int], list[np.ndarray]]:
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    return ids, list(_images(split, ids))


def _images(split, image_ids) -> np.ndarray:
    """f32[n, S, S, 3] as the model sees them (the split's preprocessing)."""
    return np.stack([split.preprocess_image(int(i)) for i in image_ids]).astype(np.float32)
