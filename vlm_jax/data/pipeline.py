"""Entry points of the caption input pipeline (TFDS array_record sources -> grain -> numpy).

Legend of dimension letters: b per-process batch, B global batch, S image side,
T token length (= data.max_caption_len + 2).

Entry points (contract in docs/interfaces.md "Data"):
  validate_data_config(config.data) -> None        (ValueError naming the key and the fix)
  get_tokenizer(config, workdir) -> WordTokenizer
  make_train_iterator(config, tokenizer, *, process_index=None, process_count=None)
      -> grain DataLoaderIterator (get_state()/set_state(state)) yielding
         dict(image=f32[b, S, S, 3], tokens=i32[b, T], image_id=i64[b])
  load_eval_split(config, tokenizer, split) -> EvalSplit

The config.data fields are listed in vlm_jax/data/datasets.py; the work is done in
datasets.py (TFDS), preprocess.py (images), train_input.py (training pairs, blind baseline)
and eval_input.py (EvalSplit). `get_dataset` and `ImagePreprocessor` are re-exported here for
callers that reach the prepared dataset through this module.
"""
from __future__ import annotations

import logging
import os

import grain.python as grain

from vlm_jax.data.datasets import get_dataset, validate_data_config
from vlm_jax.data.eval_input import EvalSplit, make_eval_split
from vlm_jax.data.preprocess import ImagePreprocessor
from vlm_jax.data.tokenizer import WordTokenizer
from vlm_jax.data.train_input import make_caption_pair_iterator

__all__ = ["validate_data_config", "get_tokenizer", "make_train_iterator", "load_eval_split",
           "EvalSplit", "get_dataset", "ImagePreprocessor"]

log = logging.getLogger(__name__)


def get_tokenizer(config, workdir: str | None) -> WordTokenizer:
    """Reloads `workdir/vocab.json` if present, else builds it from the training captions
    (data.vocab_min_count, data.vocab_max_size) and saves it there (workdir '' / None: no save).
    """
    path = os.path.join(workdir, "vocab.json") if workdir else None
    if path and os.path.exists(path):
        tok = WordTokenizer.load(path)
        log.info("Loaded vocabulary of %d tokens from %s.", tok.vocab_size, path)
        return tok
    ds = get_dataset(config.data)
    captions = (c for caps in ds.meta("train").captions for c in caps)
    tok = WordTokenizer.build(captions, min_count=config.data.vocab_min_count,
                              max_size=config.data.vocab_max_size)
    log.info("Built vocabulary of %d tokens from the %s training captions.", tok.vocab_size,
             config.data.name)
    if path:
        tok.save(path)
    return tok


def make_train_iterator(config, tokenizer: WordTokenizer, *, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DataLoaderIterator:
    """Infinite, checkpointable iterator over this process's training batches.

    Yields dict(image=f32[b, S, S, 3], tokens=i32[b, T], image_id=i64[b]) with
    b = config.train.batch_size / process_count and T = data.max_caption_len + 2; image_id is
    the dataset id of the image in `image` (rows sharing it are the same picture).
    `get_state()` -> bytes and `set_state(bytes)` restore the position exactly (the next batch
    is identical). `process_index`/`process_count` default to jax.process_index()/count().
    """
    return make_caption_pair_iterator(config, tokenizer, process_index=process_index,
                                      process_count=process_count)


def load_eval_split(config, tokenizer: WordTokenizer, split: str) -> EvalSplit:
    """EvalSplit for `split` ('val' | 'test' | 'train') of config.data's dataset."""
    return make_eval_split(config, tokenizer, split)
