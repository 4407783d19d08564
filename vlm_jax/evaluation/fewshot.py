"""Few-shot image classification with Flamingo: rank the class names by log-likelihood.

Dimension letters: E episodes (queries), B episodes per scoring call, K shots (demonstrations),
N support images of an episode, C classes, L candidate tokens (the longest class name), T tokens,
Tp prefix tokens, M media per prompt, R latents per media, D width, S image side.

The method (Flamingo's section 3 evaluation, as open_flamingo's ``evaluate_classification`` runs it):

  1. Demonstrations (`select_demonstrations`): K of the episode's N labelled support images,
     'random' (uniform without replacement) or 'rices' (Retrieval-based In-Context Example
     Selection, Yang et al. 2022: the K support images whose vision features have the highest
     cosine similarity with the query's, the MOST similar placed LAST, next to the query).
  2. Prompt (`build_prompt`): the demonstrations as chunks ``<image> this is a dax
     <|endofchunk|>`` (the episode's template filled with the demonstration's class name), then
     the query ``<image> this is a`` (the template up to "{}", no ``<|endofchunk|>``); media slot m
     holds the image of the m-th ``<image>`` marker (demonstrations first, the query last).
     0 shots, as open_flamingo defines it: two randomly drawn demonstrations with their images
     REMOVED (text only: ``this is a dax <|endofchunk|>``), then the query with its image, so
     the model sees the output format but no labelled image.
  3. Scoring: candidate c is ``tokenizer.encode(class_names[c], add_special_tokens=False)``
     (L_c tokens); its score is ``sum_j log p(cand_c[j] | prefix, cand_c[:j])`` over the
     extended vocabulary (V + X), optionally divided by L_c (``length_normalize``); the
     prediction is the argmax over the C classes (`accuracy_from_scores`). Two implementations:
       `score_classes_full`    C rows ``[prefix; cand_c]`` (right padded) per episode, one full
                               forward each (B*C rows a call);
       `score_classes_cached`  the prefix (B rows, LEFT padded, positions from the mask) is run
                               ONCE into the KV cache, the cache is repeated C times along the
                               batch axis and all candidates go through it in one decode call of
                               L - 1 tokens (B*C rows); the ``<image>`` count the candidates'
                               cross-attention needs comes from the cache (`Flamingo`'s
                               ``media_count``).
     Both encode the images once per episode (`Flamingo.encode_images` -> latents
     ``[B, M, R, D]``, repeated C times) and agree to float rounding; the cached one costs
     ~1/C of the prefix compute.

`FewShotClassificationEvaluator` runs shots x trials x selection methods over the episodes a
task makes (``make_episodes(trial_seed, num)``), reports the accuracy mean / std over trials,
the chance level and the scoring throughput, and writes ``fewshot_metrics.json`` and
``shot_curve.png`` (accuracy vs shots) under ``<workdir>/eval/step_<N>/<name>/``.
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
import jax.numpy as jnp
import numpy as np

from vlm_jax.data.interleaved import Chunk, ClassificationEpisode, encode_interleaved
from vlm_jax.evaluation import evaluator as ev_lib

log = logging.getLogger("vlm_jax")

__all__ = ["SELECTIONS", "CLASS_SELECTIONS", "ZERO_SHOT_TEXT_DEMOS", "FewShotPrompt", "select_demonstrations", "candidate_tokens",
           "build_prompt", "episode_prompt", "score_classes_full", "score_classes_cached", "accuracy_from_scores",
           "default_vision_features", "batched_features", "round_up", "replicated_jit",
           "FewShotClassificationEvaluator", "save_shot_curve"]

SELECTIONS = ("random", "rices")
#: classification also has 'balanced' (needs the support labels): N-way K-shot demonstrations.
CLASS_SELECTIONS = SELECTIONS + ("balanced",)
#: open_flamingo's 0-shot: this many text-only demonstrations (images removed) before the query.
ZERO_SHOT_TEXT_DEMOS = 2


# ------------------------------------------------------------------------ demonstrations
def select_demonstrations(support_feats, query_feat, k: int, *, method: str,
                          rng: np.random.Generator | None = None, support_labels=None) -> np.ndarray:
    """Indices ``i32[k]`` of the demonstrations among the N support items.

    support_feats: f32 ``[N, D]`` (only its length is used by 'random'); query_feat: f32 ``[D]``.
    method: 'random' -> k distinct indices drawn uniformly by ``rng`` (a numpy Generator);
      'rices' -> the k items of highest cosine similarity to the query, in increasing
      similarity (the most similar LAST, closest to the query in the prompt; ties keep the
      lower index nearer the query);
      'balanced' -> N-way K-shot (the few-shot classification protocol of miniImageNet and of
      Frozen's fast-binding tasks; needs ``support_labels`` i32[N]): the k demonstrations spread
      over the support set's classes as evenly as it allows -- classes visited round-robin in a
      random order, one more item each (drawn uniformly without replacement) until k, a class
      with no item left skipped -- then shuffled, so k >= C covers every class (the query's
      included) and k < C covers k of them. 'random' covers the query's class only by chance:
      ``1 - (1 - 1/C)^k`` for uniform labels (0.68 at C = k = 4).
      k = 0 -> empty.
    """
    n = int(np.shape(support_feats)[0])
    k = int(k)
    if method not in CLASS_SELECTIONS:
        raise ValueError(f"select_demonstrations: method={method!r}; use one of {CLASS_SELECTIONS}.")
    if k < 0 or k > n:
        raise ValueError(f"select_demonstrations: k={k} demonstrations asked from a support set of {n}.")
    if k == 0:
        return np.zeros((0,), np.int32)
    if method == "random":
        if rng is None:
            raise ValueError("select_demonstrations(method='random') needs rng=np.random.default_rng(...).")
        return np.asarray(rng.choice(n, size=k, replace=False), np.int32)
    if method == "balanced":
        if rng is None or support_labels is None:
            raise ValueError("select_demonstrations(method='balanced') needs rng= and support_labels=[N].")
        labels = np.asarray(support_labels).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"select_demonstrations: {labels.shape[0]} support labels for {n} support items.")
        pools = {int(c): list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)}
        order = [int(c) for c in rng.permutation(sorted(pools))]
        picked: list[int] = []
        while len(picked) < k:                     # k <= n, so some class always has an item left
            for c in order:
                if pools[c] and len(picked) < k:
                    picked.append(int(pools[c].pop()))
        return np.asarray(rng.permutation(picked), np.int32)
    s = np.asarray(support_feats, np.float64)
    q = np.asarray(query_feat, np.float64).reshape(-1)
    if s.ndim != 2 or s.shape[1] != q.shape[0]:
        raise ValueError(f"select_demonstrations: support_feats must be [N, D] and query_feat [D]; got {s.shape} "
                         f"and {np.shape(query_feat)}.")
    sim = (s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-12)) @ (q / max(np.linalg.norm(q), 1e-12))
    top = np.argsort(-sim, kind="stable")[:k]                   # most similar first
    return np.asarray(top[::-1], np.int32)                      # ... placed last


# ------------------------------------------------------------------------------ prompts
@dataclasses.dataclass(frozen=True)
class FewShotPrompt:
    """One episode ready to score: ``tokens`` i32[Tp] (the prefix: demonstrations + query
    prompt), ``images`` f32[M, S, S, 3] (media slot m = the m-th ``<image>``), ``candidates``
    C tuples of token ids (one per class name), ``label`` the true class."""
    tokens: tuple[int, ...]
    images: np.ndarray
    candidates: tuple[tuple[int, ...], ...]
    label: int
    demo_labels: tuple[int, ...] = ()     # the classes of the demonstrations WITH images, in prompt order


def candidate_tokens(tokenizer, class_names: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Class names -> their continuation ids (``encode(name, add_special_tokens=False)``)."""
    out = []
    for name in class_names:
        ids = tuple(int(t) for t in np.asarray(tokenizer.encode(name, add_special_tokens=False)).reshape(-1))
        if not ids:
            raise ValueError(f"candidate_tokens: class name {name!r} encodes to no tokens.")
        out.append(ids)
    return tuple(out)


def build_prompt(episode: ClassificationEpisode, demos, tokenizer, *, image_id: int, eoc_id: int,
                 text_only_demos: bool = False) -> FewShotPrompt:
    """The prompt of ``episode`` with the support items ``demos`` (i32[K], in prompt order).

    ``text_only_demos``: the demonstrations lose their images (open_flamingo's 0-shot); the
    query keeps its image, so M = 1; otherwise M = K + 1 (demonstration images, then the query).
    """
    demos = [int(i) for i in np.asarray(demos).reshape(-1)]
    n = len(episode.support_labels)
    if any(not 0 <= i < n for i in demos):
        raise ValueError(f"build_prompt: demonstration indices {demos} outside the support set of {n}.")
    names = episode.class_names
    chunks = [Chunk(episode.template.format(names[int(episode.support_labels[i])]), image=not text_only_demos)
              for i in demos]
    chunks.append(Chunk(episode.prompt, end=False))
    ids = encode_interleaved(tokenizer, chunks, image_id=image_id, eoc_id=eoc_id)
    query = np.asarray(episode.query_image, np.float32)[None]
    images = query if text_only_demos or not demos else np.concatenate(
        [np.asarray(episode.support_images, np.float32)[demos], query], axis=0)
    if sum(t == image_id for t in ids) != images.shape[0]:
        raise ValueError(f"build_prompt: {sum(t == image_id for t in ids)} <image> markers for {images.shape[0]} "
                         "images (does the template or a class name encode to the image id?).")
    shown = () if text_only_demos else tuple(int(episode.support_labels[i]) for i in demos)
    return FewShotPrompt(tuple(ids), images, candidate_tokens(tokenizer, names), int(episode.label), shown)


def episode_prompt(episode: ClassificationEpisode, shots: int, tokenizer, *, image_id: int, eoc_id: int,
                   method: str, rng: np.random.Generator, support_feats=None, query_feat=None) -> FewShotPrompt:
    """`build_prompt` with the demonstrations chosen by `select_demonstrations` (``shots`` > 0)
    or, for 0 shots, `ZERO_SHOT_TEXT_DEMOS` text-only ones drawn at random (fewer if the
    support set is smaller). 'rices' needs ``support_feats [N, D]`` and ``query_feat [D]``."""
    n = len(episode.support_labels)
    if shots == 0:
        demos = select_demonstrations(np.zeros((n, 1)), None, min(ZERO_SHOT_TEXT_DEMOS, n), method="random", rng=rng)
        return build_prompt(episode, demos, tokenizer, image_id=image_id, eoc_id=eoc_id, text_only_demos=True)
    if method == "rices" and (support_feats is None or query_feat is None):
        raise ValueError("episode_prompt(method='rices') needs support_feats and query_feat.")
    feats = np.zeros((n, 1)) if support_feats is None else support_feats
    demos = select_demonstrations(feats, query_feat, shots, method=method, rng=rng,
                                  support_labels=episode.support_labels)
    return build_prompt(episode, demos, tokenizer, image_id=image_id, eoc_id=eoc_id)


# ------------------------------------------------------------------------------ scoring
@dataclasses.dataclass
class _Packed:
    """Prompts as padded numpy arrays (E rows, padded to a multiple of the batch)."""
    images: np.ndarray          # f32[E, M, S, S, 3]
    media_valid: np.ndarray     # bool[E, M]
    cands: np.ndarray           # i32[E, C, L]   right padded
    cmask: np.ndarray           # bool[E, C, L]
    prefix_len: np.ndarray      # i32[E]


def _pack(prompts: Sequence[FewShotPrompt], cand_len: int | None = None) -> _Packed:
    if not prompts:
        raise ValueError("few-shot scoring: no prompts.")
    c = len(prompts[0].candidates)
    if any(len(p.candidates) != c for p in prompts):
        raise ValueError(f"few-shot scoring: every episode must have the same number of classes; got "
                         f"{sorted({len(p.candidates) for p in prompts})}.")
    e = len(prompts)
    m = max(p.images.shape[0] for p in prompts)
    side = prompts[0].images.shape[1:]
    length = max(len(t) for p in prompts for t in p.candidates)
    if cand_len is not None:
        if cand_len < length:
            raise ValueError(f"few-shot scoring: cand_len={cand_len} < the longest class name ({length} tokens).")
        length = int(cand_len)
    images = np.zeros((e, m) + side, np.float32)
    valid = np.zeros((e, m), bool)
    cands = np.zeros((e, c, length), np.int32)
    cmask = np.zeros((e, c, length), bool)
    for i, p in enumerate(prompts):
        images[i, :p.images.shape[0]] = p.images
        valid[i, :p.images.shape[0]] = True
        for j, t in enumerate(p.candidates):
            cands[i, j, :len(t)] = t
            cmask[i, j, :len(t)] = True
    return _Packed(images, valid, cands, cmask, np.asarray([len(p.tokens) for p in prompts], np.int32))


def _check_positions(model, total: int):
    lm = model.config.lm
    if getattr(lm, "position_embedding", "learned") == "learned" and total > lm.max_positions:
        raise ValueError(f"few-shot scoring: prompts of up to {total} tokens (prefix + class name) exceed the LM's "
                         f"max_positions={lm.max_positions}; use fewer shots or shorter demonstrations.")


@functools.lru_cache(maxsize=None)
def _scorers(model):
    """Jitted scoring functions of one (hashable) Flamingo module."""
    from vlm_jax.layers.attention import init_cache
    from vlm_jax.layers.text_common import positions_from_mask

    def encode(params, images):
        return model.apply({"params": params}, images, method="encode_images")            # [B, M, R, D]

    def candidate_logprob(params, hidden, cands, cmask):
        """hidden [N, L, E] (position j predicts cands[:, j]) -> summed log p [N]."""
        logits = model.apply({"params": params}, hidden, method="logits_from_hidden")     # [N, L, V+X] f32
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), cands[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(cmask, lp, 0.0), axis=-1)

    def rep(x, c):
        return jnp.repeat(x, c, axis=0)

    def full(params, images, media_valid, tokens, mask, gather, cands, cmask):
        """tokens/mask [B, C, T] = [prefix; cand_c] right padded; gather [B, C, L] the positions
        whose outputs predict the candidate tokens -> [B, C]."""
        b, c, t = tokens.shape
        lat = encode(params, images)
        out = model.apply({"params": params}, tokens.reshape(b * c, t), attention_mask=mask.reshape(b * c, t),
                          latents=rep(lat, c), media_valid=rep(media_valid, c))
        hidden = jnp.take_along_axis(out.hidden, gather.reshape(b * c, -1)[..., None], axis=1)   # [B*C, L, E]
        l = cands.shape[-1]
        return candidate_logprob(params, hidden, cands.reshape(b * c, l), cmask.reshape(b * c, l)).reshape(b, c)

    def cached(params, images, media_valid, prefix, pmask, cands, cmask):
        """prefix/pmask [B, Tp] LEFT padded; cands/cmask [B, C, L] -> [B, C]."""
        b, tp = prefix.shape
        c, l = cands.shape[1:]
        lat = encode(params, images)
        s = tp + l - 1
        cache = init_cache(model, params, jnp.zeros((b, s), jnp.int32), latents=lat, media_valid=media_valid)
        pos = positions_from_mask(pmask)
        key_valid = jnp.zeros((b, s), bool).at[:, :tp].set(pmask)
        out, new = model.apply({"params": params, "cache": cache}, prefix, latents=lat, media_valid=media_valid,
                               position_ids=pos, key_valid=key_valid, decode=True, mutable=["cache"])
        hidden = rep(out.hidden[:, -1:], c)                                                  # [B*C, 1, E]
        flat, fmask = cands.reshape(b * c, l), cmask.reshape(b * c, l)
        if l > 1:
            cache = jax.tree.map(lambda x: rep(x, c), new["cache"])                          # [B*C, ...]
            kv = rep(key_valid, c).at[:, tp:].set(fmask[:, :-1])
            cpos = rep(pos[:, -1:], c) + 1 + jnp.arange(l - 1, dtype=jnp.int32)[None]
            out2, _ = model.apply({"params": params, "cache": cache}, flat[:, :-1], latents=rep(lat, c),
                                  media_valid=rep(media_valid, c), position_ids=cpos, key_valid=kv, decode=True,
                                  mutable=["cache"])
            hidden = jnp.concatenate([hidden, out2.hidden], axis=1)                          # [B*C, L, E]
        return candidate_logprob(params, hidden, flat, fmask).reshape(b, c)

    return {"full": full, "cached": cached}


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def replicated_jit(fn: Callable, mesh=None) -> Callable:
    """``fn(params, *arrays)`` jitted; with a ``mesh``, the (host numpy) arrays are put on it
    replicated and the call runs under its logical rules with replicated outputs, so every
    process gets every row (the evaluators here call it on every process)."""
    if mesh is None:
        return jax.jit(fn)
    from vlm_jax import sharding
    jitted = jax.jit(fn, out_shardings=sharding.replicated(mesh))

    def call(params, *arrays):
        g = sharding.put_batch({str(i): a for i, a in enumerate(arrays)}, mesh,
                               {str(i): sharding.replicated(mesh) for i in range(len(arrays))})
        with sharding.rules_context(mesh):
            return jitted(params, *[g[str(i)] for i in range(len(arrays))])
    return call


def _run_scoring(model, params, prompts, *, kind: str, batch_size: int, length_normalize: bool, pad_id: int,
                 mesh=None, pad_to_multiple: int = 8, prefix_len: int | None = None,
                 cand_len: int | None = None) -> np.ndarray:
    packed = _pack(prompts, cand_len)
    e = len(prompts)
    bs = max(1, min(int(batch_size), e))
    longest = int(packed.prefix_len.max())
    if prefix_len is not None:
        if prefix_len < longest:
            raise ValueError(f"few-shot scoring: prefix_len={prefix_len} < the longest prefix ({longest} tokens).")
        longest = int(prefix_len)
    l = packed.cands.shape[-1]
    _check_positions(model, longest + l)
    # token lengths rounded up to a multiple, so episodes of slightly different lengths (another
    # trial, other class names) reuse the compiled function; padding never moves a position id
    mult = max(1, int(pad_to_multiple))
    tp = round_up(longest, mult)                                        # cached: the left-padded prefix
    t = round_up(longest + l, mult)                                     # full: [prefix; cand] right padded
    lm = model.config.lm
    if getattr(lm, "position_embedding", "learned") == "learned":
        t = min(t, lm.max_positions)                                     # DecoderLM refuses longer inputs
    fn = _mesh_fn(model, kind, mesh)
    out = np.zeros((e, packed.cands.shape[1]), np.float32)
    for start in range(0, e, bs):
        rows = np.minimum(np.arange(start, start + bs), e - 1)          # the last batch repeats its last row
        c = packed.cands.shape[1]
        cands, cmask = packed.cands[rows], packed.cmask[rows]
        lens = packed.prefix_len[rows]
        if kind == "cached":
            prefix = np.full((bs, tp), pad_id, np.int32)
            for r, i in enumerate(rows):
                prefix[r, tp - lens[r]:] = prompts[i].tokens
            args = (prefix, np.arange(tp)[None] >= (tp - lens)[:, None], cands, cmask)
        else:
            tokens = np.full((bs, c, t), pad_id, np.int32)
            mask = np.zeros((bs, c, t), bool)
            for r, i in enumerate(rows):
                tokens[r, :, :lens[r]] = prompts[i].tokens
                mask[r, :, :lens[r]] = True
                for j, cand in enumerate(prompts[i].candidates):
                    tokens[r, j, lens[r]:lens[r] + len(cand)] = cand
                    mask[r, j, lens[r]:lens[r] + len(cand)] = True
            gather = np.minimum(lens[:, None, None] - 1 + np.arange(l)[None, None], t - 1)
            args = (tokens, mask, np.broadcast_to(gather, (bs, c, l)).astype(np.int32), cands, cmask)
        scores = fn(params, packed.images[rows], packed.media_valid[rows], *args)
        n = min(bs, e - start)
        out[start:start + n] = np.asarray(jax.device_get(scores))[:n]
    if length_normalize:
        out = out / packed.cmask.sum(-1)
    return out


@functools.lru_cache(maxsize=None)
def _mesh_fn(model, kind: str, mesh):
    return replicated_jit(_scorers(model)[kind], mesh)


def score_classes_full(model, params, prompts: Sequence[FewShotPrompt], *, batch_size: int = 8,
                       length_normalize: bool = False, pad_id: int = 0, mesh=None,
                       pad_to_multiple: int = 8, prefix_len: int | None = None,
                       cand_len: int | None = None) -> np.ndarray:
    """f32 ``[E, C]``: summed (``length_normalize``: mean) log-probs of each class name after its
    episode's prefix, by one full forward per (episode, class) row, ``batch_size`` episodes
    (B*C rows) a call. Shapes are fixed per call: the last batch repeats its last episode, token
    lengths are rounded up to ``pad_to_multiple``, and ``prefix_len`` / ``cand_len`` pad the
    prefixes / class names to at least that many tokens (so calls over other episodes reuse the
    compiled function; padding never changes a score). ``mesh``: run under its logical rules
    with replicated inputs/outputs (every process scores every episode)."""
    return _run_scoring(model, params, prompts, kind="full", batch_size=batch_size,
                        length_normalize=length_normalize, pad_id=pad_id, mesh=mesh, pad_to_multiple=pad_to_multiple,
                        prefix_len=prefix_len, cand_len=cand_len)


def score_classes_cached(model, params, prompts: Sequence[FewShotPrompt], *, batch_size: int = 8,
                         length_normalize: bool = False, pad_id: int = 0, mesh=None,
                         pad_to_multiple: int = 8, prefix_len: int | None = None,
                         cand_len: int | None = None) -> np.ndarray:
    """As `score_classes_full`, with the prefix run once into the KV cache (left padded), the
    cache repeated C times and the candidates scored in one batched decode call."""
    return _run_scoring(model, params, prompts, kind="cached", batch_size=batch_size,
                        length_normalize=length_normalize, pad_id=pad_id, mesh=mesh, pad_to_multiple=pad_to_multiple,
                        prefix_len=prefix_len, cand_len=cand_len)


def accuracy_from_scores(scores, labels) -> float:
    """Fraction of rows of ``scores [E, C]`` whose argmax (first on ties) is ``labels [E]``."""
    scores, labels = np.asarray(scores), np.asarray(labels).reshape(-1)
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"accuracy_from_scores: scores must be [E, C] and labels [E]; got {scores.shape} and "
                         f"{labels.shape}.")
    if not len(labels):
        return float("nan")
    return float(np.mean(np.argmax(scores, axis=1) == labels))


# ------------------------------------------------------------------------ RICES features
def default_vision_features(model) -> Callable:
    """``(params, images f32[n, S, S, 3]) -> f32[n, Dv]``: the mean over every output token of the
    frozen ViT (last layer, final norm) -- the RICES similarity space (open_flamingo uses
    CLIP's pooled image embedding)."""
    fn = jax.jit(lambda p, x: model.apply(
        {"params": p}, x, method=lambda m, im: m.vision(im, deterministic=True).features.mean(axis=1)))
    return lambda params, images: np.asarray(jax.device_get(fn(params, images)), np.float32)


def batched_features(fn, params, images: np.ndarray, batch: int) -> np.ndarray:
    """``fn`` over ``images [n, ...]`` in fixed-size batches (the last one padded)."""
    n = images.shape[0]
    out = []
    for s in range(0, n, batch):
        idx = np.minimum(np.arange(s, s + batch), n - 1)
        out.append(np.asarray(fn(params, images[idx]))[:min(batch, n - s)])
    return np.concatenate(out, axis=0)


# ------------------------------------------------------------------------------ evaluator
class FewShotClassificationEvaluator(ev_lib.Evaluator):
    """Accuracy vs number of shots, per demonstration-selection method, over trials.

    Args:
      name, every: see `Evaluator`. model: a `Flamingo` module; tokenizer: its tokenizer;
      image_id, eoc_id: the ``<image>`` / ``<|endofchunk|>`` ids.
      make_episodes: ``(trial_seed, num) -> list[ClassificationEpisode]`` (the task's episodes;
        trial t uses seed ``seed + t`` and its episodes are shared by every shot count and method).
      shots: shot counts K (0 = open_flamingo's text-only demonstrations). trials: seeds.
      selection: 'random' | 'rices' | 'balanced' (N-way K-shot) or a tuple of them (each evaluated).
      num_episodes: queries per trial. use_cache: `score_classes_cached` (else the full forward).
      batch_size: episodes per scoring call. length_normalize: mean instead of summed log-prob.
      vision_features: ``(params, images f32[n, S, S, 3]) -> f32[n, D]`` for RICES
        (default `default_vision_features`). pad_id: the token padding id (default the
        tokenizer's). mesh: optional device mesh (logical rules, replicated inputs). seed: base seed.

    Metrics: ``{selection}/shots_{K}/accuracy_mean``, ``.../accuracy_std`` (population std over
    trials), ``.../examples_per_s`` (episodes scored per second, the first trial left out when
    there are several: it includes compilation), ``.../label_in_demos`` (the fraction of queries
    whose class is among the demonstrations shown with images: all that copying from the
    prompt can solve) with ``.../accuracy_given_label_in_demos`` (accuracy on those queries;
    absent when there are none, e.g. 0 shots), and ``chance`` (1 / C).
    """

    def __init__(self, *, name: str, every: int, model, tokenizer, image_id: int, eoc_id: int,
                 make_episodes: Callable[[int, int], list], shots: Sequence[int] = (0, 4, 8, 16), trials: int = 3,
                 selection: str | Sequence[str] = "random", num_episodes: int = 100, use_cache: bool = True,
                 batch_size: int = 8, length_normalize: bool = False, vision_features: Callable | None = None,
                 pad_id: int | None = None, mesh=None, seed: int = 0, feature_batch_size: int = 64):
        self.name, self.every = name, int(every)
        self._model, self._tok = model, tokenizer
        self._image_id, self._eoc_id = int(image_id), int(eoc_id)
        self._make_episodes = make_episodes
        self._shots = tuple(int(k) for k in shots)
        self._selections = (selection,) if isinstance(selection, str) else tuple(selection)
        bad = [s for s in self._selections if s not in CLASS_SELECTIONS]
        if bad or not self._selections:
            raise ValueError(f"{name}: selection={selection!r}; use any of {CLASS_SELECTIONS}.")
        if any(k < 0 for k in self._shots) or not self._shots:
            raise ValueError(f"{name}: shots={tuple(shots)} must be non-empty and >= 0.")
        if int(trials) < 1 or int(num_episodes) < 1 or int(batch_size) < 1:
            raise ValueError(f"{name}: trials={trials}, num_episodes={num_episodes} and batch_size={batch_size} "
                             "must be positive.")
        self._trials, self._num = int(trials), int(num_episodes)
        self._use_cache, self._bs, self._norm = bool(use_cache), int(batch_size), bool(length_normalize)
        self._vision_features = vision_features
        self._pad_id = int(tokenizer.pad_id if pad_id is None else pad_id)
        self._mesh, self._seed, self._feat_bs = mesh, int(seed), int(feature_batch_size)

    # ---------------------------------------------------------------------------------
    def _rices_features(self, params, episodes) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per episode (support feats [N, D], query feat [D])."""
        if self._vision_features is None:
            self._vision_features = default_vision_features(self._model)
        imgs = np.concatenate([np.concatenate([np.asarray(ep.support_images, np.float32),
                                               np.asarray(ep.query_image, np.float32)[None]]) for ep in episodes])
        feats = batched_features(self._vision_features, params, imgs, self._feat_bs)
        out, at = [], 0
        for ep in episodes:
            n = len(ep.support_labels)
            out.append((feats[at:at + n], feats[at + n]))
            at += n + 1
        return out

    def _check(self, episodes):
        for i, ep in enumerate(episodes):
            n = len(ep.support_labels)
            for k in self._shots:
                if k > n:
                    raise ValueError(f"{self.name}: {k} shots asked but episode {i} has only {n} support images "
                                     f"(shots={self._shots}); make episodes with a support set >= {max(self._shots)}.")

    def run(self, params, model_state, *, step: int, workdir: str, final: bool) -> dict[str, float]:
        del model_state, final
        score = score_classes_cached if self._use_cache else score_classes_full
        results = {s: {k: dict(accuracy=[], score_seconds=[], episodes=[], covered=[], covered_correct=[])
                       for k in self._shots}
                   for s in self._selections}
        t_start = time.time()
        trials = []                                     # per trial: (episodes, labels, RICES features)
        for trial in range(self._trials):
            episodes = list(self._make_episodes(self._seed + trial, self._num))
            if not episodes:
                raise ValueError(f"{self.name}: make_episodes({self._seed + trial}, {self._num}) returned no episodes.")
            self._check(episodes)
            feats = None
            if "rices" in self._selections and any(k > 0 for k in self._shots):
                feats = self._rices_features(params, episodes)
            trials.append((episodes, np.asarray([ep.label for ep in episodes]), feats))
        sizes = {len(ep.class_names) for eps, _, _ in trials for ep in eps}
        if len(sizes) != 1:
            raise ValueError(f"{self.name}: episodes with different numbers of classes {sorted(sizes)}.")
        num_classes = sizes.pop()
        for si, sel in enumerate(self._selections):
            for k in self._shots:
                per_trial = []
                for trial, (episodes, _, feats) in enumerate(trials):
                    # 0 shots does not depend on the selection method: the same draws for every method
                    rng = np.random.default_rng([self._seed, trial, k, si + 1 if k else 0])
                    per_trial.append([episode_prompt(ep, k, self._tok, image_id=self._image_id, eoc_id=self._eoc_id,
                                                     method=sel, rng=rng,
                                                     support_feats=None if feats is None else feats[i][0],
                                                     query_feat=None if feats is None else feats[i][1])
                                      for i, ep in enumerate(episodes)])
                # one padded shape for every trial: only the first trial's call compiles
                prefix_len = max(len(p.tokens) for ps in per_trial for p in ps)
                cand_len = max(len(c) for ps in per_trial for p in ps for c in p.candidates)
                r = results[sel][k]
                for prompts, (_, labels, _) in zip(per_trial, trials):
                    t0 = time.perf_counter()
                    scores = score(self._model, params, prompts, batch_size=self._bs, length_normalize=self._norm,
                                   pad_id=self._pad_id, mesh=self._mesh, prefix_len=prefix_len, cand_len=cand_len)
                    r["score_seconds"].append(time.perf_counter() - t0)
                    r["accuracy"].append(accuracy_from_scores(scores, labels))
                    # the query's class among the demonstrations' (with images): what copying can solve
                    covered = np.asarray([p.label in p.demo_labels for p in prompts])
                    correct = np.argmax(np.asarray(scores), axis=1) == labels
                    r["covered"].append(int(covered.sum()))
                    r["covered_correct"].append(int((covered & correct).sum()))
                    r["episodes"].append(len(prompts))

        metrics: dict[str, float] = {"chance": 1.0 / num_classes}
        summary: dict[str, Any] = {}
        for sel, per_k in results.items():
            summary[sel] = {}
            for k, r in per_k.items():
                acc = np.asarray(r["accuracy"])
                timed = slice(1, None) if len(acc) > 1 else slice(None)
                eps = float(np.sum(r["episodes"][timed]) / max(np.sum(r["score_seconds"][timed]), 1e-9))
                n_cov, n_all = int(np.sum(r["covered"])), int(np.sum(r["episodes"]))
                label_in_demos = n_cov / max(n_all, 1)
                acc_covered = float(np.sum(r["covered_correct"]) / n_cov) if n_cov else None
                summary[sel][str(k)] = dict(accuracy=[float(a) for a in acc], accuracy_mean=float(acc.mean()),
                                            accuracy_std=float(acc.std()), examples_per_s=eps,
                                            score_seconds=[float(s) for s in r["score_seconds"]],
                                            label_in_demos=float(label_in_demos),
                                            accuracy_given_label_in_demos=acc_covered)
                key = f"{sel}/shots_{k}"
                metrics[f"{key}/accuracy_mean"] = float(acc.mean())
                metrics[f"{key}/accuracy_std"] = float(acc.std())
                metrics[f"{key}/examples_per_s"] = eps
                metrics[f"{key}/label_in_demos"] = float(label_in_demos)
                if acc_covered is not None:
                    metrics[f"{key}/accuracy_given_label_in_demos"] = acc_covered
        log.info("%s: %s (%.1fs)", self.name, {k: round(v, 4) for k, v in metrics.items()}, time.time() - t_start)

        if jax.process_index() == 0:
            out_dir = os.path.join(ev_lib.eval_dir(workdir, step), self.name)
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "fewshot_metrics.json"), "w") as f:
                json.dump(dict(step=int(step), shots=list(self._shots), selections=list(self._selections),
                               trials=self._trials, num_episodes=self._num, num_classes=num_classes,
                               chance=metrics["chance"], use_cache=self._use_cache,
                               length_normalize=self._norm, results=summary, metrics=metrics), f, indent=2)
            save_shot_curve(os.path.join(out_dir, "shot_curve.png"), self._shots, summary, metrics["chance"],
                            title=f"{self.name} (step {step}, {self._trials} trials)")
        return metrics


def save_shot_curve(path: str, shots: Sequence[int], summary: dict, chance: float | None, *, title: str = "",
                    ylabel: str = "accuracy") -> str:
    """Score vs shots: mean line and mean +- std band per selection method (``summary[sel][str(K)]``
    holds ``accuracy_mean`` / ``accuracy_std``: the plotted score), chance (if given) as a dashed
    line; the y axis is [0, 1.02] when ``ylabel`` is 'accuracy', else fitted. Agg canvas, no pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = np.asarray(sorted(shots))
    for sel, per_k in summary.items():
        mean = np.asarray([per_k[str(k)]["accuracy_mean"] for k in xs])
        std = np.asarray([per_k[str(k)]["accuracy_std"] for k in xs])
        (line,) = ax.plot(xs, mean, marker="o", label=sel)
        ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", label="chance")
    ax.set_xticks(xs)
    ax.set_xlabel("shots")
    ax.set_ylabel(ylabel)
    if ylabel == "accuracy":
        ax.set_ylim(0.0, 1.02)
    else:
        ax.set_ylim(bottom=0.0)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path
