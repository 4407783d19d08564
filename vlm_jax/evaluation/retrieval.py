"""Image-text retrieval evaluator (BLIP-2's protocol, usable by any two-tower task).

Dimension letters: N images of the split, M texts (every reference caption, M >= N), Q image
embeddings per image (BLIP-2's queries; 1 for a single-vector tower), E embedding width,
k the re-ranking shortlist (``k_test``).

Protocol (BLIP-2 / BLIP, as LAVIS evaluates COCO and Flickr retrieval):
  1. ITC similarity  s[i, j] = max_q <img_iq, txt_j>  (cosine of normalised embeddings)
  2. image->text: for each image its top-k texts by s are re-scored with the matching head,
     score = ITM(i, j) + s[i, j]; texts outside the shortlist rank below every shortlisted one.
     text->image: the same with each text's top-k images.
  3. R@K (K = 1, 5, 10): image->text is a hit when *any* of the image's own captions ranks in
     the top K; text->image when the caption's image does. Ranks are strict: a candidate tied
     with the best true one counts as ranked above it.
Without a matching function the evaluator reports the ITC ranking only.

Files under ``<workdir>/eval/step_<N>/``: ``retrieval_metrics.json`` (R@K both ways, with
and without re-ranking) and ``retrieval_examples.png`` (text queries, their top-5 images, the
true image framed in green).
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable, Iterator

import jax
import numpy as np

from vlm_jax.evaluation import evaluator as ev_lib

log = logging.getLogger("vlm_jax")

KS = (1, 5, 10)


def strict_recall(scores: np.ndarray, truth: np.ndarray, ks=KS) -> dict[int, float]:
    """``scores [queries, candidates]``, ``truth`` bool of the same shape (each query has >= 1
    true candidate). Rank of a query = number of false candidates scoring >= its best true one;
    -> {K: mean(rank < K)}."""
    best_true = np.max(np.where(truth, scores, -np.inf), axis=1, keepdims=True)
    rank = np.sum((scores >= best_true) & ~truth, axis=1)
    return {k: float(np.mean(rank < k)) for k in ks}


def shortlist_scores(sim: np.ndarray, k: int, rescore: Callable[[np.ndarray, np.ndarray], np.ndarray] | None):
    """``sim [A, C]`` -> ``[A, C]``: for each row its top-k columns get ``rescore(rows, cols) + sim``
    (both int arrays of the pairs), the others -inf. ``rescore=None`` returns ``sim``."""
    if rescore is None:
        return sim
    k = min(k, sim.shape[1])
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]                   # [A, k]
    rows = np.repeat(np.arange(sim.shape[0]), k)
    cols = top.reshape(-1)
    out = np.full(sim.shape, -np.inf, np.float64)
    out[rows, cols] = rescore(rows, cols) + sim[rows, cols]
    return out


class RetrievalEvaluator(ev_lib.Evaluator):
    """Retrieval over one split.

    Args:
      name, every: see `Evaluator`.
      embed_images: jittable ``(params, model_state, {'image'}) -> {'img': [b, Q, E] or [b, E],
        optional 'feats': [b, ...]}`` ('feats' is what ``match`` reads for the image side).
      embed_texts: jittable ``(params, model_state, {'tokens'}) -> {'txt': [b, E]}``.
      match: None or jittable ``(params, model_state, {'feats', 'tokens'}) -> {'score': [b]}``
        (BLIP-2: the ITM "match" logit averaged over queries).
      load_split: () -> EvalSplit. tokenizer: encodes the references (``encode_padded``).
      token_len: T. batch_size: GLOBAL batch of every pass. k_test: shortlist size.
      max_examples: 0 = all images. num_figure_queries: text queries in the PNG (0 = none).
    """

    def __init__(self, *, name: str, every: int, embed_images: Callable, embed_texts: Callable,
                 match: Callable | None, load_split: Callable, tokenizer, token_len: int, batch_size: int,
                 k_test: int, max_examples: int, mesh, num_figure_queries: int = 4):
        self.name, self.every = name, int(every)
        self._img = ev_lib.make_predict_fn(embed_images, mesh, ("image",))
        self._txt = ev_lib.make_predict_fn(embed_texts, mesh, ("tokens",), id_key="text_id")
        self._match = None if match is None else ev_lib.make_predict_fn(match, mesh, ("feats", "tokens"),
                                                                        id_key="pair_id")
        self._load_split, self._tok, self._token_len = load_split, tokenizer, int(token_len)
        self._batch_size, self._k, self._max_examples = int(batch_size), int(k_test), int(max_examples)
        self._num_fig = int(num_figure_queries)

    # ------------------------------------------------------------------ batches
    def _local(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """This process's rows of one global batch (as the data package's eval batches)."""
        from vlm_jax.data.processes import local_batch_size, resolve_process
        index, count = resolve_process(None, None)
        b = local_batch_size(self._batch_size, count, f"config.evals.{self.name}.batch_size")
        return {k: v[index * b:(index + 1) * b] for k, v in rows.items()}

    def _global_batches(self, arrays: dict[str, np.ndarray], id_key: str) -> Iterator[dict[str, np.ndarray]]:
        """Global batches over the rows of ``arrays`` (last one padded), each cut to this process."""
        n = len(next(iter(arrays.values())))
        bs = self._batch_size
        for lo in range(0, n, bs):
            hi = min(lo + bs, n)
            batch = {}
            for k, v in arrays.items():
                pad = np.zeros((bs - (hi - lo),) + v.shape[1:], v.dtype)
                batch[k] = np.concatenate([v[lo:hi], pad], axis=0)
            batch[id_key] = np.concatenate([np.arange(lo, hi), np.full(bs - (hi - lo), -1)]).astype(np.int64)
            batch["valid"] = batch[id_key] >= 0
            yield self._local(batch)

    # ------------------------------------------------------------------ run
    def run(self, params, model_state, *, step: int, workdir: str, final: bool) -> dict[str, float]:
        t0 = time.time()
        split = self._load_split().subset(self._max_examples)
        img_rows = ev_lib.predict_over_split(self._img, params, model_state, split.batches(self._batch_size))
        image_ids = np.asarray(sorted(img_rows), np.int64)
        img = np.stack([img_rows[i]["img"] for i in image_ids]).astype(np.float32)
        if img.ndim == 2:
            img = img[:, None]                                                 # [N, 1, E]
        captions = [(int(i), c) for i in image_ids for c in split.references[int(i)]]
        text_image = np.asarray([i for i, _ in captions], np.int64)           # [M]
        tokens = np.stack([self._tok.encode_padded(c, self._token_len) for _, c in captions]).astype(np.int32)
        txt_rows = ev_lib.predict_over_split(self._txt, params, model_state,
                                             self._global_batches({"tokens": tokens}, "text_id"))
        txt = np.stack([txt_rows[j]["txt"] for j in range(len(captions))]).astype(np.float32)   # [M, E]

        sim = np.max(np.einsum("iqe,te->itq", img, txt), axis=-1).astype(np.float64)            # [N, M]
        truth = image_ids[:, None] == text_image[None, :]                                        # [N, M]
        metrics: dict[str, float] = {}
        for k, v in strict_recall(sim, truth).items():
            metrics[f"itc_i2t_r{k}"] = v
        for k, v in strict_recall(sim.T, truth.T).items():
            metrics[f"itc_t2i_r{k}"] = v

        i2t, t2i = sim, sim.T
        if self._match is not None:
            feats = np.stack([img_rows[i]["feats"] for i in image_ids])

            def rescore(img_idx, txt_idx):
                rows = ev_lib.predict_over_split(
                    self._match, params, model_state,
                    self._global_batches({"feats": feats[img_idx], "tokens": tokens[txt_idx]}, "pair_id"))
                return np.asarray([rows[p]["score"] for p in range(len(img_idx))], np.float64)

            i2t = shortlist_scores(sim, self._k, rescore)
            t2i = shortlist_scores(sim.T, self._k, lambda t, i: rescore(i, t))
        for k, v in strict_recall(i2t, truth).items():
            metrics[f"i2t_r{k}"] = v
        for k, v in strict_recall(t2i, truth.T).items():
            metrics[f"t2i_r{k}"] = v
        metrics["r_mean"] = float(np.mean([metrics[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in KS]))
        metrics.update(num_images=float(len(image_ids)), num_texts=float(len(captions)),
                       k_test=float(min(self._k, len(captions))) if self._match is not None else 0.0)

        if jax.process_index() == 0:
            out = ev_lib.eval_dir(workdir, step)
            with open(os.path.join(out, f"{self.name}_metrics.json"), "w") as f:
                json.dump({"step": int(step), "final": bool(final), **metrics}, f, indent=2)
            if self._num_fig:
                try:
                    plot_text_queries(os.path.join(out, f"{self.name}_examples.png"), split, image_ids,
                                      captions, t2i, self._num_fig)
                except Exception as e:            # a figure never fails an evaluation
                    log.warning("retrieval figure not written: %s", e)
        log.info("retrieval (%d images, %d texts) in %.1f s: i2t R@1 %.3f, t2i R@1 %.3f", len(image_ids),
                 len(captions), time.time() - t0, metrics["i2t_r1"], metrics["t2i_r1"])
        return metrics


def plot_text_queries(path: str, split, image_ids: np.ndarray, captions, t2i: np.ndarray, n: int,
                      top: int = 5) -> None:
    """PNG: one row per text query (its caption, then its top images; the true image framed green)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(captions))
    queries = np.linspace(0, len(captions) - 1, n).astype(int)
    top = min(top, len(image_ids))
    fig, axes = plt.subplots(n, top, figsize=(2.0 * top, 2.3 * n), squeeze=False)
    for r, q in enumerate(queries):
        true_id, caption = captions[q]
        order = np.argsort(-t2i[q], kind="stable")[:top]
        for c, i in enumerate(order):
            ax = axes[r, c]
            ax.imshow(split.get_image(int(image_ids[i])))
            ax.set_xticks([]), ax.set_yticks([])
            hit = int(image_ids[i]) == true_id
            for s in ax.spines.values():
                s.set_edgecolor("green" if hit else "lightgray")
                s.set_linewidth(4 if hit else 1)
            ax.set_title(f"#{c + 1}{' (true)' if hit else ''}", fontsize=8)
        axes[r, 0].set_ylabel("\n".join(caption[i:i + 28] for i in range(0, min(len(caption), 84), 28)),
                              fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
