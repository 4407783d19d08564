"""Training input: (image, caption) pairs as a grain source, the blind baseline, the loader.

Legend of dimension letters: b per-process batch, B global batch, S image side,
T padded token length (= data.max_caption_len + 2 for the word tokenizer).

Training examples are (image, caption) pairs: every caption of every training image is one
example. The order is a seeded global shuffle (config.seed), reshuffled every epoch,
repeating forever; each process reads its own contiguous shard of the examples
(process_index / process_count). Captions are tokenised and padded per example, before
batching.
"""
from __future__ import annotations

import logging
import re
from typing import Sequence

import grain.python as grain
import numpy as np

from vlm_jax.data.datasets import EncodedImages, get_dataset
from vlm_jax.data.preprocess import ImagePreprocessor, preprocessor_for
from vlm_jax.data.processes import absl_flags_ready, local_batch_size, resolve_process

log = logging.getLogger(__name__)


class BlindImage(grain.RandomMapTransform):
    """Blind baseline: gives each example the image of a uniformly random OTHER record.

    The choice uses the per-example rng grain derives from (seed, position in the sampled
    stream), so it is deterministic, restored with the iterator state, and differs between
    epochs: the image carries no information about the caption, even on the training set.
    `image_id` becomes the id of the image shown (what a contrastive loss must compare).
    """

    def __init__(self, images: EncodedImages, image_ids: np.ndarray,
                 preprocess: ImagePreprocessor):
        if len(image_ids) < 2:
            raise ValueError("config.data.blind=True needs at least 2 training images, got "
                             f"{len(image_ids)}.")
        self._images, self._ids, self._preprocess = images, image_ids, preprocess

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        r = int(element.pop("caption_record"))
        k = int(rng.integers(len(self._ids) - 1))
        shown = k + (k >= r)
        element["image"] = self._preprocess(self._images[shown])
        element["image_id"] = np.int64(self._ids[shown])
        return element


class CaptionPairSource(grain.RandomAccessDataSource):
    """Random-access (image, caption) pairs.

    Index j -> dict(image=f32 [S, S, 3], tokens=i32 [T], image_id=i64 []). Pair j is caption
    `cap_idx[j]` of record `rec_idx[j]` with that record's image. Decoding and tokenisation
    happen here so grain's read threads parallelise them. blind=True leaves the image out and
    returns `caption_record` instead, for `BlindImage` to fill in (image and image_id).

    tokenizer: anything with `encode_padded(text, max_len) -> i32 [max_len]`
    (vlm_jax/data/tokenizer_api.py); token_len = T.
    """

    def __init__(self, images: EncodedImages, captions: Sequence[Sequence[str]],
                 image_ids: np.ndarray, tokenizer, token_len: int,
                 preprocess: ImagePreprocessor, blind: bool = False, name: str = ""):
        if len(image_ids) != len(captions):
            raise ValueError(f"CaptionPairSource {name!r}: {len(image_ids)} image ids for "
                             f"{len(captions)} caption lists; pass one id per record.")
        counts = np.asarray([len(c) for c in captions], np.int64)
        self._rec_idx = np.repeat(np.arange(len(captions)), counts)
        self._cap_idx = (np.arange(counts.sum()) -
                         np.repeat(np.cumsum(counts) - counts, counts)).astype(np.int64)
        self._images, self._captions = images, captions
        self._ids = np.asarray(image_ids, np.int64)
        self._tokenizer, self._token_len, self._preprocess = tokenizer, token_len, preprocess
        self._blind, self._name = blind, name

    def __len__(self) -> int:
        return len(self._rec_idx)

    def __getitem__(self, j) -> dict[str, np.ndarray]:
        r, c = int(self._rec_idx[int(j)]), int(self._cap_idx[int(j)])
        out = {"tokens": self._tokenizer.encode_padded(self._captions[r][c], self._token_len)}
        if self._blind:
            out["caption_record"] = np.int64(r)
        else:
            out["image"] = self._preprocess(self._images[r])
            out["image_id"] = self._ids[r]
        return out

    def __repr__(self) -> str:
        # grain checks this repr when an iterator state is restored: keep it descriptive (and
        # unchanged, so that states saved before image_id was added still restore)
        return (f"CaptionPairSource({self._name!r}, pairs={len(self)}, "
                f"images={len(self._captions)}, max_words={self._token_len - 2}, "
                f"blind={self._blind})")


def select_captions(captions: Sequence[Sequence[str]], pattern: str, name: str = "",
                    repeat: int = 0) -> Sequence[Sequence[str]]:
    """The training captions under ``config.data.caption_pattern`` / ``caption_pattern_repeat``.

    pattern '': ``captions`` itself. Else, with repeat 0, each record's captions that ``pattern``
    finds (``re.search``); records left with none drop out of training (their images are not
    paired). With repeat n >= 1, every caption, each one the pattern finds n times (an epoch then
    holds those pairs n times: oversampling, e.g. the synthetic set's location captions, without
    dropping the others). ValueError, naming ``config.data.caption_pattern``, when no caption of the
    split matches."""
    if not pattern:
        return captions
    rx = re.compile(pattern)
    n_all = sum(map(len, captions))
    n_found = sum(1 for caps in captions for c in caps if rx.search(c))
    if n_found == 0:
        raise ValueError(f"config.data.caption_pattern={pattern!r} finds none of the {n_all} training captions "
                         f"of {name}; fix the expression or set it to '' (every caption).")
    if repeat:
        kept = [[c for c in caps for _ in range(repeat if rx.search(c) else 1)] for caps in captions]
        log.info("config.data.caption_pattern=%r, caption_pattern_repeat=%d: %d of %d captions found, %d "
                 "training pairs.", pattern, repeat, n_found, n_all, sum(map(len, kept)))
        return kept
    kept = [[c for c in caps if rx.search(c)] for caps in captions]
    log.info("config.data.caption_pattern=%r: training on %d of %d captions (%d of %d images).", pattern,
             n_found, n_all, sum(1 for c in kept if c), len(kept))
    return kept


def make_caption_pair_iterator(config, tokenizer, *, process_index: int | None = None,
                               process_count: int | None = None) -> grain.DataLoaderIterator:
    """Infinite, checkpointable iterator over this process's (image, caption) batches.

    Yields dict(image=f32 [b, S, S, 3], tokens=i32 [b, T], image_id=i64 [b]) with
    b = config.train.batch_size / process_count and T = data.max_caption_len + 2.
    `get_state()` -> bytes and `set_state(bytes)` restore the position exactly.
    """
    data = config.data
    seed = config.seed
    if not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"config.seed={seed!r}: the data shuffle needs an int in [0, 2**32).")
    index, count = resolve_process(process_index, process_count)
    b = local_batch_size(config.train.batch_size, count, "config.train.batch_size")
    ds = get_dataset(data)
    meta = ds.meta("train")
    images = ds.images("train")
    preprocess = preprocessor_for(data)
    captions = select_captions(meta.captions, data.get("caption_pattern", ""), f"{ds.full_name}:train",
                               repeat=data.get("caption_pattern_repeat", 0))
    pairs = CaptionPairSource(images, captions, meta.image_ids, tokenizer,
                              data.max_caption_len + 2, preprocess, blind=data.blind,
                              name=f"{ds.full_name}:train")
    blind = [BlindImage(images, meta.image_ids, preprocess)] if data.blind else []
    if len(pairs) < config.train.batch_size:
        raise ValueError(f"config.train.batch_size={config.train.batch_size} exceeds the "
                         f"{len(pairs)} training (image, caption) pairs; lower it or use more "
                         "training images.")
    if data.worker_count > 0:
        absl_flags_ready()
    shard = grain.ShardOptions(shard_index=index, shard_count=count, drop_remainder=True)
    sampler = grain.IndexSampler(num_records=len(pairs), shard_options=shard, shuffle=True,
                                 num_epochs=None, seed=seed)
    loader = grain.DataLoader(
        data_source=pairs, sampler=sampler,
        operations=blind + [grain.Batch(batch_size=b, drop_remainder=True)],
        worker_count=data.worker_count,
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(64, 2 * b)))
    log.info("Training on %d (image, caption) pairs from %d images%s; process %d/%d reads "
             "batches of %d.", len(pairs), len(meta.captions),
             " (BLIND: captions paired with other images)" if data.blind else "",
             index, count, b)
    return iter(loader)
