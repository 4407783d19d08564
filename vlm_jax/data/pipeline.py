"""Input pipeline: TFDS array_record data sources -> grain -> numpy batches.

Legend of dimension letters: b per-process batch, B global batch, S image side,
T token length (= data.max_caption_len + 2).

Entry points (contract in docs/interfaces.md "Data"):
  get_tokenizer(config, workdir) -> WordTokenizer
  make_train_iterator(config, tokenizer, *, process_index=None, process_count=None)
      -> grain DataLoaderIterator (get_state()/set_state(state)) yielding
         dict(image=f32[b, S, S, 3], tokens=i32[b, T])
  load_eval_split(config, tokenizer, split) -> EvalSplit

Config fields read (all under `config.data`, plus `config.seed` and `config.train.batch_size`):
  name: str             'synthetic_shapes' | 'karpathy_captions'
  data_dir: str         TFDS data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  manual_dir: str       karpathy_captions: folder with the split JSON + images ('' = TFDS
                        default <data_dir>/downloads/manual); unused for synthetic
  builder_config: str   karpathy_captions: 'coco' | 'flickr8k' | 'flickr30k';
                        synthetic_shapes: must be ''
  image_size: int       S, model input side. synthetic: also the side the images are drawn at
  num_train, num_val, num_test: int
                        synthetic: number of images per split (part of the dataset name);
                        karpathy: use only the first n images of the split (0 = all)
  max_caption_len: int  words kept per caption (longer captions are truncated); T = this + 2
  vocab_min_count: int  a word needs this many training occurrences to enter the vocabulary
  vocab_max_size: int   cap on the vocabulary size including the 4 specials (0 = no cap)
  blind: bool           blind baseline: every training example gets the image of a random
                        other training image, drawn afresh per example and epoch
                        (deterministic given config.seed; see BlindImage)
  worker_count: int     grain worker processes (0 = in-process; >0 needs a __main__ guard)
  mean, std: tuple[float, float, float]
                        per-channel normalisation on the [0, 1] scale: x = (pixel/255 - mean)/std

Preprocessing: decode (PIL) -> RGB -> shorter side to S (bilinear, PIL) + centre crop ->
float32 -> normalise. Captions are tokenised and padded (<bos> w.. <eos> <pad>..) per
example, before batching. The dataset is prepared (download_and_prepare into data_dir,
array_record) on first use; the time it took is logged.

Training examples are (image, caption) pairs: every caption of every training image is one
example. The order is a seeded global shuffle (config.seed), reshuffled every epoch,
repeating forever; each process reads its own contiguous shard of the examples
(process_index / process_count, default jax.process_index() / jax.process_count()).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
from typing import Iterator, Sequence

import grain.python as grain
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from vlm_jax.data.common import decode_rgb, resize_center_crop
from vlm_jax.data.karpathy import KarpathyCaptions
from vlm_jax.data.synthetic import SyntheticShapes
from vlm_jax.data.tokenizer import WordTokenizer

log = logging.getLogger(__name__)

DATASETS = ("synthetic_shapes", "karpathy_captions")
SPLITS = ("train", "val", "test")
_FIELDS = ("name", "data_dir", "manual_dir", "builder_config", "image_size", "num_train",
           "num_val", "num_test", "max_caption_len", "vocab_min_count", "vocab_max_size",
           "blind", "worker_count", "mean", "std")


# ----------------------------------------------------------------- validation
def validate_data_config(data) -> None:
    """Raises ValueError naming the `config.data` key and the fix for any bad value."""
    missing = [k for k in _FIELDS if k not in data]
    if missing:
        raise ValueError(f"config.data is missing {missing}; see the field list in "
                         "vlm_jax/data/pipeline.py's docstring.")

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
        names = [c.name for c in KarpathyCaptions.BUILDER_CONFIGS]
        if data.builder_config not in names:
            bad("builder_config", f"karpathy_captions needs one of {names}.")
        for k in ("num_train", "num_val", "num_test"):
            if not isinstance(data[k], int) or data[k] < 0:
                bad(k, "use 0 (whole split) or a positive cap on the number of images.")
    for k, low in (("image_size", 16), ("max_caption_len", 1), ("vocab_min_count", 1),
                   ("vocab_max_size", 0), ("worker_count", 0)):
        if not isinstance(data[k], int) or data[k] < low:
            bad(k, f"must be an int >= {low}.")
    if 0 < data.vocab_max_size <= 4:
        bad("vocab_max_size", "must exceed the 4 special tokens (or be 0 for no cap).")
    if not isinstance(data.blind, bool):
        bad("blind", "must be True or False.")
    for k in ("mean", "std"):
        v = tuple(data[k])
        if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
            bad(k, "must be 3 floats (per RGB channel, [0, 1] pixel scale).")
    if any(s <= 0 for s in data.std):
        bad("std", "must be positive.")


# ----------------------------------------------------------------- TFDS side
def make_builder(data) -> tfds.core.DatasetBuilder:
    """The TFDS builder named by `config.data` (not prepared yet)."""
    validate_data_config(data)
    data_dir = data.data_dir or None
    if data.name == "synthetic_shapes":
        return SyntheticShapes(data_dir=data_dir, image_size=data.image_size,
                               num_train=data.num_train, num_val=data.num_val,
                               num_test=data.num_test)
    return KarpathyCaptions(config=data.builder_config, data_dir=data_dir)


def ensure_prepared(builder: tfds.core.DatasetBuilder, manual_dir: str = "") -> None:
    """download_and_prepare (array_record) unless already prepared; logs the time taken."""
    if builder.is_prepared():
        return
    log.warning("Preparing %s into %s (first use) ...", builder.info.full_name, builder.data_dir)
    start = time.time()
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))
    log.warning("Prepared %s in %.1f s.", builder.info.full_name, time.time() - start)


def _prepare_once(data) -> tfds.core.DatasetBuilder:
    """Prepares the dataset; with several JAX processes, process 0 builds first.

    The others wait at a barrier (always taken when process_count > 1, prepared or not, so
    that every process passes the same barriers), then re-open the builder (its info is read
    from disk). On hosts without a shared data_dir they find nothing and build their own
    copy. Must run after `jax.distributed.initialize`, in the same order on every process
    (it does: every process makes the same pipeline calls).
    """
    import jax  # only here: process index/count and the barrier
    builder = make_builder(data)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        if jax.process_index() == 0:
            ensure_prepared(builder, data.manual_dir)
        multihost_utils.sync_global_devices(f"vlm_jax.data: prepared {builder.info.full_name}")
        builder = make_builder(data)
    ensure_prepared(builder, data.manual_dir)
    return builder


@dataclasses.dataclass(frozen=True)
class _SplitMeta:
    """Everything but the pixels of the first `n` records of a split, in record order."""
    image_ids: np.ndarray                  # int64 [n]
    captions: tuple[tuple[str, ...], ...]
    objects: tuple[tuple[dict, ...], ...]
    questions: tuple[tuple[dict, ...], ...]


def _split_cap(data, split: str) -> int:
    if data.name == "karpathy_captions":
        return data[f"num_{split}"]  # 0 = whole split
    return 0  # synthetic: the split has exactly num_<split> images


class _Dataset:
    """Prepared builder + per-split data sources (image bytes undecoded) + caption metadata."""

    def __init__(self, data):
        self.data = data
        self.builder = _prepare_once(data)

    @functools.cache
    def source(self, split: str):
        """Records with every feature decoded except the image (left as encoded bytes)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: use one of {SPLITS}.")
        return self.builder.as_data_source(
            split=split, decoders={"image": tfds.decode.SkipDecoding()})

    @functools.cache
    def images(self, split: str) -> "EncodedImages":
        """record index -> encoded image bytes, without parsing the other features."""
        self.source(split)  # validates the split name
        return EncodedImages(self.builder.as_data_source(
            split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES))

    def num_records(self, split: str) -> int:
        n, cap = len(self.source(split)), _split_cap(self.data, split)
        return min(n, cap) if cap else n

    @functools.cache
    def meta(self, split: str) -> _SplitMeta:
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
                qs.append(tuple(dict(question=_text(a), answer=_text(b), qtype=_text(c))
                                for a, b, c in zip(q["question"], q["answer"], q["qtype"])))
        log.info("Read captions of %d %s images of %s in %.1f s.", n, split,
                 self.builder.info.full_name, time.time() - start)
        return _SplitMeta(np.asarray(ids, np.int64), tuple(caps), tuple(objs), tuple(qs))


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


def _data_key(data) -> tuple:
    return tuple((k, tuple(data[k]) if k in ("mean", "std") else data[k]) for k in _FIELDS)


@functools.lru_cache(maxsize=8)
def _dataset_cached(key: tuple) -> _Dataset:
    return _Dataset(_DataView(dict(key)))


class _DataView(dict):
    """Snapshot of config.data values with attribute access (what _Dataset reads)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def get_dataset(data) -> _Dataset:
    """Prepared dataset for `config.data` (cached per process by the data config values)."""
    validate_data_config(data)
    return _dataset_cached(_data_key(data))


# ------------------------------------------------------------- preprocessing
class ImagePreprocessor:
    """Encoded image bytes -> float32 [S, S, 3] normalised (and the uint8 [S, S, 3] view)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size = image_size
        self.mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, np.float32).reshape(1, 1, 3)

    def uint8(self, data: bytes) -> np.ndarray:
        return resize_center_crop(decode_rgb(data), self.image_size)

    def normalise(self, img: np.ndarray) -> np.ndarray:
        return ((img.astype(np.float32) / 255.0 - self.mean) / self.std).astype(np.float32)

    def __call__(self, data: bytes) -> np.ndarray:
        return self.normalise(self.uint8(data))


def _preprocessor(data) -> ImagePreprocessor:
    return ImagePreprocessor(data.image_size, data.mean, data.std)


class BlindImage(grain.RandomMapTransform):
    """Blind baseline: gives each example the image of a uniformly random OTHER record.

    The choice uses the per-example rng grain derives from (seed, position in the sampled
    stream), so it is deterministic, restored with the iterator state, and differs between
    epochs: the image carries no information about the caption, even on the training set.
    """

    def __init__(self, images: "EncodedImages", num_records: int, preprocess: ImagePreprocessor):
        if num_records < 2:
            raise ValueError("config.data.blind=True needs at least 2 training images, got "
                             f"{num_records}.")
        self._images, self._n, self._preprocess = images, num_records, preprocess

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        r = int(element.pop("caption_record"))
        k = int(rng.integers(self._n - 1))
        element["image"] = self._preprocess(self._images[k + (k >= r)])
        return element


class CaptionPairSource(grain.RandomAccessDataSource):
    """Random-access (image, caption) pairs: index j -> dict(image=f32[S,S,3], tokens=i32[T]).

    Pair j is caption `cap_idx[j]` of record `rec_idx[j]` with that record's image. Decoding
    and tokenisation happen here so grain's read threads parallelise them. blind=True leaves
    the image out and returns `caption_record` instead, for `BlindImage` to fill in.
    """

    def __init__(self, images: EncodedImages, captions: Sequence[Sequence[str]],
                 tokenizer: WordTokenizer,
                 max_words: int, preprocess: ImagePreprocessor,
                 blind: bool = False, name: str = ""):
        counts = np.asarray([len(c) for c in captions], np.int64)
        self._rec_idx = np.repeat(np.arange(len(captions)), counts)
        self._cap_idx = (np.arange(counts.sum()) -
                         np.repeat(np.cumsum(counts) - counts, counts)).astype(np.int64)
        self._images, self._captions = images, captions
        self._tokenizer, self._max_words, self._preprocess = tokenizer, max_words, preprocess
        self._blind, self._name = blind, name

    def __len__(self) -> int:
        return len(self._rec_idx)

    def pair(self, j: int) -> tuple[int, int]:
        """-> (record, caption index) of example j."""
        return int(self._rec_idx[j]), int(self._cap_idx[j])

    def __getitem__(self, j) -> dict[str, np.ndarray]:
        r, c = self.pair(int(j))
        out = {"tokens": self._tokenizer.encode_padded(self._captions[r][c], self._max_words)}
        if self._blind:
            out["caption_record"] = np.int64(r)
        else:
            out["image"] = self._preprocess(self._images[r])
        return out

    def __repr__(self) -> str:
        # grain checks this repr when an iterator state is restored: keep it descriptive
        return (f"CaptionPairSource({self._name!r}, pairs={len(self)}, "
                f"images={len(self._captions)}, max_words={self._max_words}, "
                f"blind={self._blind})")


# -------------------------------------------------------------- entry points
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


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only for the defaults
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    return process_index, process_count


def _local_batch(global_batch: int, process_count: int, what: str) -> int:
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"{what}={global_batch} must be a positive multiple of the number of "
                         f"processes ({process_count}); change {what}.")
    return global_batch // process_count


def make_train_iterator(config, tokenizer: WordTokenizer, *, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DataLoaderIterator:
    """Infinite, checkpointable iterator over this process's training batches.

    Yields dict(image=f32[b, S, S, 3], tokens=i32[b, T]) with b = config.train.batch_size /
    process_count and T = data.max_caption_len + 2. `get_state()` -> bytes and
    `set_state(bytes)` restore the position exactly (the next batch is identical).
    `process_index`/`process_count` default to jax.process_index()/jax.process_count().
    """
    data = config.data
    seed = config.seed
    if not isinstance(seed, int) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"config.seed={seed!r}: the data shuffle needs an int in [0, 2**32).")
    index, count = _process(process_index, process_count)
    b = _local_batch(config.train.batch_size, count, "config.train.batch_size")
    ds = get_dataset(data)
    meta = ds.meta("train")
    images = ds.images("train")
    pairs = CaptionPairSource(images, meta.captions, tokenizer, data.max_caption_len,
                              _preprocessor(data), blind=data.blind,
                              name=f"{ds.builder.info.full_name}:train")
    blind = [BlindImage(images, len(meta.captions), _preprocessor(data))] if data.blind else []
    if len(pairs) < config.train.batch_size:
        raise ValueError(f"config.train.batch_size={config.train.batch_size} exceeds the "
                         f"{len(pairs)} training (image, caption) pairs; lower it or use more "
                         "training images.")
    if data.worker_count > 0:
        _absl_flags_ready()
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


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags (e.g. --grain_enable_multiprocess_worker_profiling);
    this project parses its own flags with argparse, so absl's are marked parsed at their
    defaults (a caller that parsed absl flags itself keeps its values)."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass
class EvalSplit:
    """One evaluation split: references, objects, questions and batches of images.

    image_ids: int64 [N] in record order; references[image_id] -> list of captions;
    objects[image_id] -> list of {shape, color, size, bbox f32[4]} (empty for photos);
    questions[image_id] -> list of {question, answer, qtype}.
    """
    name: str
    split: str
    image_ids: np.ndarray
    references: dict[int, list[str]]
    objects: dict[int, list[dict]]
    questions: dict[int, list[dict]]
    _images: EncodedImages
    _records: dict[int, int]
    _preprocess: ImagePreprocessor
    _tokenizer: WordTokenizer
    _max_words: int

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, max_examples: int) -> "EvalSplit":
        """The first `max_examples` images (all when max_examples <= 0 or >= len)."""
        if max_examples <= 0 or max_examples >= len(self):
            return self
        ids = self.image_ids[:max_examples]
        keep = set(ids.tolist())
        return dataclasses.replace(
            self, image_ids=ids,
            references={k: v for k, v in self.references.items() if k in keep},
            objects={k: v for k, v in self.objects.items() if k in keep},
            questions={k: v for k, v in self.questions.items() if k in keep})

    def get_image(self, image_id: int, *, resized: bool = True) -> np.ndarray:
        """uint8 [S, S, 3] as the model sees it (resized=True) or the stored [H, W, 3]."""
        if int(image_id) not in self._records:
            raise KeyError(f"image_id {image_id} is not in the {self.name} {self.split} split.")
        data = self._images[self._records[int(image_id)]]
        return self._preprocess.uint8(data) if resized else decode_rgb(data)

    def batches(self, batch_size: int, *, process_index: int | None = None,
                process_count: int | None = None,
                with_tokens: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Batches over the whole split, in image_ids order, last one padded.

        `batch_size` is GLOBAL: process p receives rows [p*b, (p+1)*b) of every global batch
        (b = batch_size / process_count), so every process yields the same number of batches.
        Yields dict(image=f32[b, S, S, 3], image_id=i64[b] (-1 on padding), valid=bool[b])
        and, with_tokens=True, tokens=i32[b, T] of each image's first reference caption.
        """
        index, count = _process(process_index, process_count)
        b = _local_batch(batch_size, count, "eval batch_size")
        s = self._preprocess.image_size
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for lo in range(0, len(self), batch_size):
                rows = self.image_ids[lo + index * b: lo + (index + 1) * b]
                out = {"image": np.zeros((b, s, s, 3), np.float32),
                       "image_id": np.full((b,), -1, np.int64),
                       "valid": np.zeros((b,), bool)}
                images = pool.map(lambda i: self._preprocess(
                    self._images[self._records[int(i)]]), rows)
                for k, img in enumerate(images):
                    out["image"][k] = img
                out["image_id"][:len(rows)] = rows
                out["valid"][:len(rows)] = True
                if with_tokens:
                    out["tokens"] = np.zeros((b, self._max_words + 2), np.int32)
                    for k, i in enumerate(rows):
                        out["tokens"][k] = self._tokenizer.encode_padded(
                            self.references[int(i)][0], self._max_words)
                yield out


def load_eval_split(config, tokenizer: WordTokenizer, split: str) -> EvalSplit:
    """EvalSplit for `split` ('val' | 'test' | 'train') of config.data's dataset."""
    data = config.data
    ds = get_dataset(data)
    meta = ds.meta(split)
    ids = [int(i) for i in meta.image_ids]
    return EvalSplit(
        name=ds.builder.info.full_name, split=split, image_ids=meta.image_ids,
        references={i: list(c) for i, c in zip(ids, meta.captions)},
        objects={i: list(o) for i, o in zip(ids, meta.objects)},
        questions={i: list(q) for i, q in zip(ids, meta.questions)},
        _images=ds.images(split), _records={i: r for r, i in enumerate(ids)},
        _preprocess=_preprocessor(data), _tokenizer=tokenizer,
        _max_words=data.max_caption_len)
