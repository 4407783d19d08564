"""MMC4-style interleaved documents (Zhu et al. 2023, "Multimodal C4") from local JSONL files:
a TFDS builder, and the rule that turns a document into Flamingo chunks.

Input (`manual_dir`): ``*.jsonl`` / ``*.jsonl.gz`` files (read in sorted name order), one
document per line, in MMC4's format::

    {"url": ..., "text_list": ["sentence 0", "sentence 1", ...],
     "image_info": [{"image_name": "a1b2.jpg", "matched_text_index": 1, "matched_sim": 0.31, ...}, ...],
     "similarity_matrix": [[...], ...]}          # images x sentences (optional)

and the images at ``manual_dir/images/<image_name>`` (or ``manual_dir/<image_name>``). Each image
is assigned to the sentence MMC4 matched it to (``matched_text_index``, with its CLIP similarity
``matched_sim``); where those fields are absent they come from ``similarity_matrix`` (the
argmax of the image's row). Records keep every readable image with its sentence and
similarity; the similarity threshold and the image / token limits are applied when reading
(`document_chunks`), so one prepared dataset serves any threshold.

Record features: doc_id int64 (document order over the files), texts [sentences],
images [jpeg], image_sentence int64 [per image], image_sim f32 [per image].
Skipped and counted (one log line; ``builder.skipped['train']``): lines that are not JSON or not
a document (line number of the first one logged), documents without text, image entries without
a name or a sentence, missing and undecodable image files (the image is dropped, the document
kept), documents left without any image. Everything lands in the 'train' split (MMC4 is a
pretraining corpus).

Chunks (open_flamingo's interleaving): an image goes in front of the sentence it matched; the
sentences from that image up to the next image are its chunk (``<image> text <|endofchunk|>``);
sentences before the first image are text-only (they carry no loss); several images matched to
one sentence each get their own ``<image>`` (all but the last with an empty chunk).
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from vlm_jax.data.common import PackageBuilderMixin, load_image_jpeg, report_counts

log = logging.getLogger(__name__)

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put MMC4-format documents and their images into `manual_dir` (config.data.mmc4.manual_dir):

  manual_dir/
    docs_00000.jsonl (or .jsonl.gz) ...   one JSON document per line: text_list, image_info
    images/<image_name> ...               every image_info[].image_name

(https://github.com/allenai/mmc4: the released shards are such JSONL files; the images are
downloaded separately from their raw_url.)
"""


@dataclasses.dataclass(eq=False)
class Mmc4Config(tfds.core.BuilderConfig):
    max_side: int = 512          # images with a longer side are downscaled; 0 = keep size


class Mmc4Local(PackageBuilderMixin, tfds.core.GeneratorBasedBuilder):
    """Interleaved web documents (MMC4 format) from local JSONL + image files."""

    name = "mmc4_local"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [Mmc4Config(name="default", description="MMC4-format JSONL documents")]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.skipped: dict[str, dict[str, int]] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "doc_id": np.int64,
                "texts": tfds.features.Sequence(tfds.features.Text()),
                "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg")),
                "image_sentence": tfds.features.Sequence(np.int64),
                "image_sim": tfds.features.Sequence(np.float32),
            }),
            homepage="https://github.com/allenai/mmc4", disable_shuffling=True)

    def _split_generators(self, dl_manager):
        from vlm_jax.errors import DataError
        root = os.fspath(dl_manager.manual_dir)
        files = sorted(glob.glob(os.path.join(root, "*.jsonl")) + glob.glob(os.path.join(root, "*.jsonl.gz")))
        if not files:
            raise DataError(f"mmc4_local: no *.jsonl / *.jsonl.gz files in {root}.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
        return {"train": self._generate_examples(root, files)}

    def _find_image(self, root: str, name: str) -> str | None:
        for p in (os.path.join(root, "images", name), os.path.join(root, name)):
            if os.path.isfile(p):
                return p
        return None

    def _generate_examples(self, root: str, files: list[str]):
        counts = collections.Counter()
        first_bad = None
        doc_id = 0
        for path in files:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)
                        texts = [" ".join(str(t).split()) for t in doc["text_list"]]
                        infos = list(doc.get("image_info") or [])
                    except (ValueError, KeyError, TypeError):
                        counts["bad_lines"] += 1
                        first_bad = first_bad or f"{os.path.basename(path)}:{line_no}"
                        continue
                    if not any(texts):
                        counts["docs_without_text"] += 1
                        continue
                    sims = doc.get("similarity_matrix")
                    kept = []
                    for k, info in enumerate(infos):
                        sentence, sim = _assignment(info, sims, k, len(texts))
                        if not isinstance(info, dict) or not info.get("image_name") or sentence is None:
                            counts["bad_image_entries"] += 1
                            continue
                        p = self._find_image(root, str(info["image_name"]))
                        data = load_image_jpeg(p, self.builder_config.max_side) if p else None
                        if data is None:
                            counts["missing_images" if p is None else "corrupt_images"] += 1
                            continue
                        kept.append((sentence, float(sim), data))
                    if not kept:
                        counts["docs_without_images"] += 1
                        continue
                    kept.sort(key=lambda x: x[0])            # stable: MMC4's image order within a sentence
                    counts["docs"] += 1
                    counts["images"] += len(kept)
                    yield doc_id, {"doc_id": doc_id, "texts": texts, "images": [d for _, _, d in kept],
                                   "image_sentence": [s for s, _, _ in kept], "image_sim": [x for _, x, _ in kept]}
                    doc_id += 1
        keys = ("docs", "images", "bad_lines", "docs_without_text", "bad_image_entries", "missing_images",
                "corrupt_images", "docs_without_images")
        self.skipped["train"] = report_counts("mmc4_local train", counts, keys, written=2,
                                              extra=f" (first bad line: {first_bad})" if first_bad else "", logger=log)


def _assignment(info, sims, k: int, num_texts: int) -> tuple[int | None, float]:
    """(sentence index, similarity) of image k: MMC4's matched_text_index / matched_sim, else the
    argmax of its similarity-matrix row; (None, 0) when neither gives a valid sentence."""
    if not isinstance(info, dict):
        return None, 0.0
    idx, sim = info.get("matched_text_index"), info.get("matched_sim")
    if idx is None and isinstance(sims, list) and k < len(sims) and sims[k]:
        row = [float(x) for x in sims[k]]
        idx = int(np.argmax(row))
        sim = row[idx]
    try:
        idx = int(idx)
    except (TypeError, ValueError):
        return None, 0.0
    if not 0 <= idx < num_texts:
        return None, 0.0
    return idx, float(sim if sim is not None else 1.0)


def document_chunks(texts, image_sentence, image_sim, *, threshold: float, max_images: int):
    """-> (chunks, kept image indices): the images with similarity >= ``threshold`` (at most
    ``max_images``, in document order) interleaved with the sentences as the module docstring
    says. ``chunks`` are `vlm_jax.data.interleaved.Chunk`; the m-th image chunk uses image
    ``kept[m]`` of the record."""
    from vlm_jax.data.interleaved import Chunk
    keep = [k for k in range(len(image_sentence)) if float(image_sim[k]) >= threshold][:max_images]
    at = collections.defaultdict(list)
    for k in keep:
        at[int(image_sentence[k])].append(k)
    chunks, current, order = [], None, []
    for i, text in enumerate(texts):
        for k in at.get(i, []):
            if current is not None:
                chunks.append(current)
            current = Chunk("", image=True, end=True)
            order.append(k)
        if current is None:
            chunks.append(Chunk(text, image=False, end=False))     # before the first image: no loss
        else:
            current = dataclasses.replace(current, text=(current.text + " " + text).strip())
    if current is not None:
        chunks.append(current)
    # text-only leading pieces merge into one chunk
    merged = []
    for c in chunks:
        if merged and not c.image and not merged[-1].image:
            merged[-1] = dataclasses.replace(merged[-1], text=merged[-1].text + " " + c.text)
        else:
            merged.append(c)
    return merged, order


class Mmc4Records:
    """Random access to the prepared documents of a split with the images left encoded: record r ->
    {texts [str], images [JPEG bytes], image_sentence int64 [n], image_sim f32 [n]}. Reads the
    serialized tf.Example directly (TFDS' numpy decoding cannot skip-decode a sequence of images)."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str = "train"):
        self._raw = builder.as_data_source(split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, r: int) -> dict:
        from tensorflow_datasets.proto import tf_example_pb2
        f = tf_example_pb2.Example.FromString(self._raw[int(r)]).features.feature
        return {"texts": [t.decode("utf-8") for t in f["texts"].bytes_list.value],
                "images": list(f["images"].bytes_list.value),
                "image_sentence": np.asarray(f["image_sentence"].int64_list.value, np.int64),
                "image_sim": np.asarray(f["image_sim"].float_list.value, np.float32)}
