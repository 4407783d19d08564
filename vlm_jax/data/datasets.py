"""TFDS side of the input pipeline: config.data validation, builder lookup, preparing the
dataset once across processes, per-split data sources and metadata, encoded-image access.

Legend of dimension letters: n records (images) used from a split.

Config fields read (all under `config.data`; the pipeline modules read the rest):
  name: str             'synthetic_shapes' | 'karpathy_captions' | 'vqav2' (questions + the ten
                        human answers, no captions: an evaluation set, vlm_jax/data/vqav2.py)
  data_dir: str         TFDS data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  manual_dir: str       karpathy_captions / vqav2: folder with the split JSON(s) + images ('' =
                        TFDS default <data_dir>/downloads/manual); unused for synthetic
  builder_config: str   karpathy_captions: 'coco' | 'flickr8k' | 'flickr30k';
                        vqav2: '' or 'default'; synthetic_shapes: must be ''
  image_size: int       S, model input side. synthetic: also the side the images are drawn at
  num_train, num_val, num_test: int
                        synthetic: number of images per split (part of the dataset name);
                        karpathy / vqav2: use only the first n images of the split (0 = all)
  max_caption_len: int  words kept per caption (longer captions are truncated); T = this + 2
  vocab_min_count: int  a word needs this many training occurrences to enter the vocabulary
  vocab_max_size: int   cap on the vocabulary size including the 4 specials (0 = no cap)
  blind: bool           blind baseline (see vlm_jax/data/train_input.py BlindImage)
  caption_pattern: str  optional; a regular expression: train only on the captions it finds
                        (re.search), '' = all (a diagnostic: e.g. the synthetic set's location
                        captions alone). Evaluation keeps every reference.
  caption_pattern_repeat: int  optional, default 0: with caption_pattern, 0 trains only on the
                        captions it finds; n >= 1 trains on every caption, those it finds n times
  worker_count: int     grain worker processes (0 = in-process; >0 needs a __main__ guard)
  mean, std: tuple[float, float, float]
                        per-channel normalisation on the [0, 1] scale: x = (pixel/255 - mean)/std

The dataset is prepared (download_and_prepare into data_dir, array_record) on first use; the
time it took is logged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import re
import time
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from vlm_jax.data.karpathy import KarpathyCaptions
from vlm_jax.data.synthetic import SyntheticShapes
from vlm_jax.data.vqav2 import VQAv2

log = logging.getLogger(__name__)

DATASETS = ("synthetic_shapes", "karpathy_captions", "vqav2")
LOCAL_FILES = {"karpathy_captions": "the Karpathy split JSON and the image folders (see vlm_jax/data/karpathy.py)",
               "vqav2": "the VQAv2 question / annotation JSONs and train2014/ val2014/ (see vlm_jax/data/vqav2.py)"}
SPLITS = ("train", "val", "test")
FIELDS = ("name", "data_dir", "manual_dir", "builder_config", "image_size", "num_train",
          "num_val", "num_test", "max_caption_len", "vocab_min_count", "vocab_max_size",
          "blind", "worker_count", "mean", "std")


# ----------------------------------------------------------------- validation
def validate_data_config(data) -> None:
    """Raises ValueError naming the `config.data` key and the fix for any bad value."""
    missing = [k for k in FIELDS if k not in data]
    if missing:
        raise ValueError(f"config.data is missing {missing}; see the field list in "
                         "vlm_jax/data/datasets.py's docstring.")

    def bad(key, why):
        raise ValueError(f"config.data.{key}={data[key]!r}: {why}")

    if data.name not in DATASETS:
        bad("name", f"unknown dataset; use one of {DATASETS}.")
    if data.name == "synthetic_shapes":
        if data.builder_config:
            bad("builder_config", "synthetic_shapes has no builder configs; set it to ''.")
        for k in ("num_train", "num_val", "num_test"):
            if not isinstance(data[k], int) or data[k] < 1:
                bad(k, "synthetic_shapes needs a positive number of images per split.")
    else:
        if data.name == "karpathy_captions":
            names = [c.name for c in KarpathyCaptions.BUILDER_CONFIGS]
            if data.builder_config not in names:
                bad("builder_config", f"karpathy_captions needs one of {names}.")
        elif data.builder_config not in ("", "default"):
            bad("builder_config", "vqav2 has one builder config: use '' (or 'default').")
        for k in ("num_train", "num_val", "num_test"):
            if not isinstance(data[k], int) or data[k] < 0:
                bad(k, "use 0 (whole split) or a positive cap on the number of images.")
        if data.manual_dir and not os.path.isdir(data.manual_dir):
            bad("manual_dir", f"is not a directory; point it at the folder holding {LOCAL_FILES[data.name]}.")
    for k, low in (("image_size", 16), ("max_caption_len", 1), ("vocab_min_count", 1),
                   ("vocab_max_size", 0), ("worker_count", 0)):
        if not isinstance(data[k], int) or data[k] < low:
            bad(k, f"must be an int >= {low}.")
    if 0 < data.vocab_max_size <= 4:
        bad("vocab_max_size", "must exceed the 4 special tokens (or be 0 for no cap).")
    if not isinstance(data.blind, bool):
        bad("blind", "must be True or False.")
    if "caption_pattern" in data:
        if not isinstance(data.caption_pattern, str):
            bad("caption_pattern", "must be a regular expression string ('' = every caption).")
        try:
            re.compile(data.caption_pattern)
        except re.error as e:
            bad("caption_pattern", f"is not a regular expression ({e}); '' trains on every caption.")
    if "caption_pattern_repeat" in data:
        r = data.caption_pattern_repeat
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            bad("caption_pattern_repeat", "must be an int >= 0 (0: only the captions caption_pattern finds; "
                "n >= 1: every caption, those it finds n times).")
        elif r and not data.get("caption_pattern", ""):
            bad("caption_pattern_repeat", f"={r} repeats the captions caption_pattern finds, but caption_pattern "
                "is ''; set the expression or leave caption_pattern_repeat at 0.")
    for k in ("mean", "std"):
        v = tuple(data[k])
        if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            bad(k, "must be 3 floats (per RGB channel, [0, 1] pixel scale).")
    if any(s <= 0 for s in data.std):
        bad("std", "must be positive.")


# ----------------------------------------------------------------- builders
def make_builder(data) -> tfds.core.DatasetBuilder:
    """The TFDS builder named by `config.data` (not prepared yet)."""
    validate_data_config(data)
    data_dir = data.data_dir or None
    if data.name == "synthetic_shapes":
        return SyntheticShapes(data_dir=data_dir, image_size=data.image_size,
                               num_train=data.num_train, num_val=data.num_val,
                               num_test=data.num_test)
    if data.name == "vqav2":
        return VQAv2(config="default", data_dir=data_dir)
    return KarpathyCaptions(config=data.builder_config, data_dir=data_dir)


def ensure_prepared(builder: tfds.core.DatasetBuilder, manual_dir: str = "") -> None:
    """download_and_prepare (array_record) unless already prepared; logs the time taken."""
    if builder.is_prepared():
        return
    log.warning("Preparing %s into %s (first use) ...", builder.info.full_name, builder.data_dir)
    start = time.time()
    try:
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))
    except AssertionError as e:     # TFDS' own check of an empty / absent manual_dir
        if "Manual directory" not in str(e):
            raise
        from vlm_jax.errors import DataError
        where = manual_dir or "the TFDS default <data_dir>/downloads/manual"
        raise DataError(f"{builder.info.full_name}: the manual_dir {where} is empty or missing; set "
                        f"--config.data.manual_dir to the folder with its files:\n"
                        f"{getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', '')}") from None
    log.warning("Prepared %s in %.1f s.", builder.info.full_name, time.time() - start)


def prepare_once(data) -> tfds.core.DatasetBuilder:
    """Prepares the dataset `config.data` names (see `prepare_builder_once`)."""
    return prepare_builder_once(lambda: make_builder(data), data.manual_dir)


def prepare_builder_once(make: Callable[[], tfds.core.DatasetBuilder],
                         manual_dir: str = "") -> tfds.core.DatasetBuilder:
    """Prepares `make()`'s dataset once, however many processes ask for it.

    * Several JAX processes: process 0 builds first; the others wait at a barrier (always
      taken when process_count > 1, prepared or not, so that every process passes the same
      barriers), then re-open the builder (its info is read from disk). On hosts without a
      shared data_dir they find nothing and build their own copy. Must run after
      `jax.distributed.initialize`, in the same order on every process (it does: every
      process makes the same pipeline calls).
    * Independent runs on one machine (two `train.py` started together on a fresh data_dir):
      an exclusive file lock next to the dataset's folder lets one build while the others
      wait, then re-open the finished dataset, instead of both building and the second
      failing to rename its copy onto the first's.
    """
    import jax  # only here: process index/count and the barrier
    builder = make()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if jax.process_index() == 0:
            with _build_lock(builder):
                ensure_prepared(make(), manual_dir)
        multihost_utils.sync_global_devices(f"vlm_jax.data: prepared {builder.info.full_name}")
        builder = make()
    if not builder.is_prepared():
        with _build_lock(builder):
            builder = make()              # another run may have finished it while we waited
            ensure_prepared(builder, manual_dir)
    return builder


@contextlib.contextmanager
def _build_lock(builder: tfds.core.DatasetBuilder):
    """fcntl lock on `<data_dir>/<name>/<config>/.prepare.lock` (local data_dirs only)."""
    folder = os.path.dirname(os.fspath(builder.data_dir).rstrip("/"))
    if "://" in folder:                   # gs:// etc.: no local lock; multi-host uses the barrier
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".prepare.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------- per split
@dataclasses.dataclass(frozen=True)
class SplitMeta:
    """Everything but the pixels of the first n records of a split, in record order."""
    image_ids: np.ndarray                  # int64 [n]
    captions: tuple[tuple[str, ...], ...]
    objects: tuple[tuple[dict, ...], ...]
    questions: tuple[tuple[dict, ...], ...]


class EncodedImages:
    """Random access to the encoded 'image' feature of raw tf.Example records.

    Parsing only this field costs ~0.02 ms per record instead of ~0.1 ms for decoding all
    features (captions, objects, questions) through TFDS.
    """

    def __init__(self, raw_source):
        self._raw = raw_source

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, record: int) -> bytes:
        example = tf_example_pb2.Example.FromString(self._raw[record])
        return example.features.feature["image"].bytes_list.value[0]


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class Dataset:
    """Prepared builder + per-split data sources (image bytes undecoded) + caption metadata."""

    def __init__(self, data):
        self.data = data
        self.builder = prepare_once(data)

    @property
    def full_name(self) -> str:
        return self.builder.info.full_name

    @functools.cache
    def source(self, split: str):
        """Records with every feature decoded except the image (left as encoded bytes)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: use one of {SPLITS}.")
        if split not in self.builder.info.splits:
            from vlm_jax.errors import DataError
            raise DataError(f"{self.full_name} has no {split!r} split (it has {sorted(self.builder.info.splits)}); "
                            "point the evaluation at one of those (e.g. --config.evals.<name>.split=val).")
        return self.builder.as_data_source(
            split=split, decoders={"image": tfds.decode.SkipDecoding()})

    @functools.cache
    def images(self, split: str) -> EncodedImages:
        """record index -> encoded image bytes, without parsing the other features."""
        self.source(split)  # validates the split name
        return EncodedImages(self.builder.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES))

    def num_records(self, split: str) -> int:
        """n: the split's records, capped by config.data.num_<split> for karpathy_captions."""
        n = len(self.source(split))
        cap = self.data[f"num_{split}"] if self.data.name != "synthetic_shapes" else 0
        return min(n, cap) if cap else n

    @functools.cache
    def meta(self, split: str) -> SplitMeta:
        start = time.time()
        src, n = self.source(split), self.num_records(split)
        ids, caps, objs, qs = [], [], [], []
        for lo in range(0, n, 512):
            for ex in src.__getitems__(list(range(lo, min(n, lo + 512)))):
                ids.append(int(ex["image_id"]))
                caps.append(tuple(_text(c) for c in ex["captions"]))
                o = ex["objects"]
                objs.append(tuple(
                    dict(shape=_text(s), color=_text(c), size=_text(z),
                         bbox=np.asarray(b, np.float32))
                    for s, c, z, b in zip(o["shape"], o["color"], o["size"], o["bbox"])))
                q = ex["questions"]
                rows = [dict(question=_text(a), answer=_text(b), qtype=_text(c))
                        for a, b, c in zip(q["question"], q["answer"], q["qtype"])]
                if "answers" in q:                  # VQAv2: official ids, the human answers, answer types
                    for r, qid, ans, at in zip(rows, q["question_id"], q["answers"], q["answer_type"]):
                        r.update(question_id=int(qid), answers=_text(ans).split("\n"), answer_type=_text(at))
                qs.append(tuple(rows))
        log.info("Read captions of %d %s images of %s in %.1f s.", n, split, self.full_name,
                 time.time() - start)
        return SplitMeta(np.asarray(ids, np.int64), tuple(caps), tuple(objs), tuple(qs))


class _DataView(dict):
    """Snapshot of config.data values with attribute access (what Dataset reads)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


@functools.lru_cache(maxsize=8)
def _dataset_cached(key: tuple) -> Dataset:
    return Dataset(_DataView(dict(key)))


def get_dataset(data) -> Dataset:
    """Prepared dataset for `config.data` (cached per process by the data config values)."""
    validate_data_config(data)
    key = tuple((k, tuple(data[k]) if k in ("mean", "std") else data[k]) for k in FIELDS)
    return _dataset_cached(key)
