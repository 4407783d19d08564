"""Evaluation input: one split's references, objects, questions and padded image batches.

Legend of dimension letters: N images in the split, b per-process batch, S image side,
T padded token length.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable, Iterator

import numpy as np

from vlm_jax.data.datasets import EncodedImages, get_dataset
from vlm_jax.data.preprocess import ImagePreprocessor, preprocessor_for
from vlm_jax.data.processes import local_batch_size, resolve_process


@dataclasses.dataclass
class EvalSplit:
    """One evaluation split: references, objects, questions and batches of images.

    image_ids: int64 [N] in record order; references[image_id] -> list of captions;
    objects[image_id] -> list of {shape, color, size, bbox f32[4]} (empty for photos);
    questions[image_id] -> list of {question, answer, qtype} (VQAv2 also: question_id, answers,
    answer_type).
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
    _tokenizer: object          # vlm_jax/data/tokenizer_api.py Tokenizer
    _token_len: int             # T

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
        return self._preprocess.uint8(data) if resized else self._preprocess.raw(data)

    def preprocess_image(self, image_id: int) -> np.ndarray:
        """f32 [S, S, 3]: the model input of one image (the split's preprocessing, as `batches`)."""
        if int(image_id) not in self._records:
            raise KeyError(f"image_id {image_id} is not in the {self.name} {self.split} split.")
        return self._preprocess(self._images[self._records[int(image_id)]])

    def batches(self, batch_size: int, *, process_index: int | None = None,
                process_count: int | None = None,
                with_tokens: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Batches over the whole split, in image_ids order, last one padded.

        `batch_size` is GLOBAL: process p receives rows [p*b, (p+1)*b) of every global batch
        (b = batch_size / process_count), so every process yields the same number of batches.
        Yields dict(image=f32[b, S, S, 3], image_id=i64[b] (-1 on padding), valid=bool[b])
        and, with_tokens=True, tokens=i32[b, T] of each image's first reference caption.
        """
        index, count = resolve_process(process_index, process_count)
        b = local_batch_size(batch_size, count, "eval batch_size")
        s = self._preprocess.image_size
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for lo in range(0, len(self), batch_size):
                rows = self.image_ids[lo + index * b: lo + (index + 1) * b]
                out = {"image": np.zeros((b, s, s, 3), np.float32),
                       "image_id": np.full((b,), -1, np.int64),
                       "valid": np.zeros((b,), bool)}
                images = pool.map(self.preprocess_image, rows)
                for k, img in enumerate(images):
                    out["image"][k] = img
                out["image_id"][:len(rows)] = rows
                out["valid"][:len(rows)] = True
                if with_tokens:
                    out["tokens"] = np.full((b, self._token_len), self._tokenizer.pad_id,
                                            np.int32)
                    for k, i in enumerate(rows):
                        out["tokens"][k] = self._tokenizer.encode_padded(
                            self.references[int(i)][0], self._token_len)
                yield out


    def question_table(self) -> dict[int, dict]:
        """{question id: {image_id, question, answers, question_type, answer_type}} over the split's
        images, in image order. VQAv2 keeps its official ids and ten human answers; a question of
        the synthetic set (one answer, no id) gets id ``image_id * 1000 + k`` (k its index in the
        image) and its answer as the only reference (scored 0 / 1, `vlm_jax.evaluation.vqa`)."""
        out = {}
        for image_id in self.image_ids.tolist():
            for k, q in enumerate(self.questions.get(int(image_id), [])):
                qid = int(q["question_id"]) if "question_id" in q else int(image_id) * 1000 + k
                if qid in out:
                    raise ValueError(f"question id {qid} occurs twice in the {self.name} {self.split} split.")
                out[qid] = dict(image_id=int(image_id), question=q["question"],
                                answers=list(q.get("answers") or [q["answer"]]), question_type=q.get("qtype", ""),
                                answer_type=q.get("answer_type", ""))
        return out

    def question_batches(self, batch_size: int, encode: Callable[[str], dict[str, np.ndarray]], *,
                         table: dict[int, dict] | None = None, process_index: int | None = None,
                         process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Batches over the split's questions (`question_table` order), last one padded; the
        GLOBAL `batch_size` is split over processes as in `batches`. ``encode(question)`` gives
        the task's per-row prompt arrays (e.g. {'prompt': i32[Tp], 'prompt_mask': bool[Tp]}),
        stacked here. Yields dict(image=f32[b, S, S, 3] (each question's image), question_id=i64[b]
        (-1 on padding), valid=bool[b], **prompt arrays [b, ...])."""
        index, count = resolve_process(process_index, process_count)
        b = local_batch_size(batch_size, count, "eval batch_size")
        s = self._preprocess.image_size
        table = self.question_table() if table is None else table
        qids = np.asarray(list(table), np.int64)
        template = {k: np.asarray(v) for k, v in encode("").items()}
        cache: dict[int, np.ndarray] = {}       # an image's questions are consecutive: decode it once
        for lo in range(0, len(qids), batch_size):
            rows = qids[lo + index * b: lo + (index + 1) * b]
            out = {"image": np.zeros((b, s, s, 3), np.float32), "question_id": np.full((b,), -1, np.int64),
                   "valid": np.zeros((b,), bool)}
            out.update({k: np.zeros((b,) + v.shape, v.dtype) for k, v in template.items()})
            for r, qid in enumerate(rows.tolist()):
                q = table[qid]
                if q["image_id"] not in cache:
                    cache.clear()
                    cache[q["image_id"]] = self.preprocess_image(q["image_id"])
                out["image"][r] = cache[q["image_id"]]
                for k, v in encode(q["question"]).items():
                    out[k][r] = v
            out["question_id"][:len(rows)] = rows
            out["valid"][:len(rows)] = True
            yield out


def make_eval_split(config, tokenizer, split: str) -> EvalSplit:
    """EvalSplit for `split` ('val' | 'test' | 'train') of config.data's dataset; tokens
    (with_tokens=True) are padded to T = data.max_caption_len + 2."""
    data = config.data
    ds = get_dataset(data)
    meta = ds.meta(split)
    ids = [int(i) for i in meta.image_ids]
    return EvalSplit(
        name=ds.full_name, split=split, image_ids=meta.image_ids,
        references={i: list(c) for i, c in zip(ids, meta.captions)},
        objects={i: list(o) for i, o in zip(ids, meta.objects)},
        questions={i: list(q) for i, q in zip(ids, meta.questions)},
        _images=ds.images(split), _records={i: r for r, i in enumerate(ids)},
        _preprocess=preprocessor_for(data), _tokenizer=tokenizer,
        _token_len=data.max_caption_len + 2)
