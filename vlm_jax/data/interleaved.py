"""Interleaved image-text sequences for Flamingo: the token layout, synthetic documents, and the
nonce-word in-context episodes.

Dimension letters: M media slots per example, S image side, T token length, N support images.

Token layout (open_flamingo's): a document is a list of *chunks*; a chunk is an optional image
followed by its text, closed by ``<|endofchunk|>`` when the text belongs to that image::

    <bos> <image> a red circle <|endofchunk|> <image> two blue squares <|endofchunk|> <eos>

`encode_interleaved` turns chunks into ids (``<image>`` / ``<|endofchunk|>`` are the
Flamingo model's extra ids ``image_id`` / ``eoc_id``); the m-th ``<image>`` of a row belongs to
media slot m. Which text a token may read is decided by the model (each token sees the most
recent preceding image) and what is trained by `vlm_jax.models.flamingo.interleaved_loss_mask`.

Sources (grain random-access, index -> dict of numpy arrays, deterministic per index):
  `CaptionDocSource`     one image + one of its captions as a 1-image document (the paper's
                         image-text pairs).
  `SyntheticDocSource`   1..M images of a split, each followed by one of its captions, with
                         text-only sentences between some chunks (interleaved web-page stand-in).
  `QADocSource`          1..M images, each with one of its questions and the answer in the VQA
                         prompt's format (text-only: the LM's question-answer text).
  `Mmc4DocSource`        web documents in MMC4's format (`vlm_jax.data.mmc4`): images above a
                         similarity threshold placed before their matched sentences.
  `NonceEpisodeSource`   in-context episodes: fresh nonce words bound to the colours of
                         single-object images ("<image> this is a dax <|endofchunk|>" ...); the
                         binding changes every episode, so a nonce word can only be predicted
                         from the earlier chunks of its own episode.
Every source yields ``tokens i32[T]``, ``images f32[M, S, S, 3]`` (zeros in unused slots) and
``media_valid bool[M]``; ``text_only=True`` drops the images, their markers and ``<|endofchunk|>`` (only
``tokens``: the chunks' texts one after the other, all in the LM's own vocabulary), for the
text-only pretraining of the synthetic LM that Flamingo then keeps frozen.

`ClassificationEpisode` is what the few-shot evaluator scores: a labelled support set, a
query image and the class names ranked by log-likelihood.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

__all__ = ["Chunk", "encode_interleaved", "ClassificationEpisode", "nonce_words", "NONCE_TEMPLATE",
           "FILLER", "CaptionDocSource", "SyntheticDocSource", "QADocSource", "Mmc4DocSource", "NonceEpisodeSource",
           "single_object_records"]

#: Demonstration text of the nonce task; the query prompt is the text before "{}".
NONCE_TEMPLATE = "this is a {}"
FILLER = ("here is another picture", "look at the next one", "the page goes on", "more shapes follow")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One piece of an interleaved document: ``<image>`` (if ``image``) + ``text`` (+
    ``<|endofchunk|>`` if ``end``)."""
    text: str
    image: bool = True
    end: bool = True


def encode_interleaved(tokenizer, chunks: Sequence[Chunk], *, image_id: int, eoc_id: int,
                       add_bos: bool = True, add_eos: bool = False) -> list[int]:
    """Chunks -> token ids: [bos] + per chunk ([image_id] + text ids + [eoc_id]) (+ [eos]).

    ``tokenizer`` is any `vlm_jax.data.tokenizer_api.Tokenizer` (text ids come from
    ``encode(text, add_special_tokens=False)``); its bos is used when it has one.
    """
    ids: list[int] = []
    if add_bos and tokenizer.bos_id is not None:
        ids.append(int(tokenizer.bos_id))
    for c in chunks:
        if c.image:
            ids.append(int(image_id))
        if c.text:
            ids.extend(int(t) for t in tokenizer.encode(c.text, add_special_tokens=False))
        if c.end:
            ids.append(int(eoc_id))
    if add_eos:
        ids.append(int(tokenizer.eos_id))
    return ids


@dataclasses.dataclass(frozen=True)
class ClassificationEpisode:
    """One few-shot classification query.

    support_images f32[N, S, S, 3] with support_labels i32[N] (indices into ``class_names``);
    query_image f32[S, S, 3] of class ``label``; a demonstration reads
    ``template.format(class_names[support_labels[i]])`` after its image, the query
    ``template`` up to "{}" (the prompt), and each class name is scored as its continuation.
    """
    support_images: np.ndarray
    support_labels: np.ndarray
    query_image: np.ndarray
    label: int
    class_names: tuple[str, ...]
    template: str = NONCE_TEMPLATE

    @property
    def prompt(self) -> str:
        return self.template.split("{}")[0].strip()


def nonce_words(n: int, exclude: Sequence[str] = ()) -> list[str]:
    """``n`` pronounceable nonce words (consonant-vowel-consonant, e.g. 'dax', 'wug'), fixed order,
    none of them in ``exclude`` (the caption vocabulary)."""
    taken = set(exclude)
    out = []
    for c1, v, c2 in itertools.product("bdfgkmnptvz", "aeiou", "gkpxz"):
        w = c1 + v + c2
        if w not in taken:
            out.append(w)
        if len(out) == n:
            return out
    raise ValueError(f"nonce_words: only {len(out)} nonce words are available, {n} asked.")


def single_object_records(objects_per_image) -> dict[str, np.ndarray]:
    """{colour: record indices of the images with exactly one object, of that colour}."""
    by: dict[str, list[int]] = {}
    for r, objs in enumerate(objects_per_image):
        if len(objs) == 1:
            by.setdefault(objs[0]["color"], []).append(r)
    return {k: np.asarray(v, np.int64) for k, v in sorted(by.items())}


# ----------------------------------------------------------------------------- sources
class _DocSourceBase:
    """Shared: token layout, padding to T, decoding images into the M slots."""

    _code = 0          # per-class stream id: example j of a source is drawn from rng([seed, code, j])

    def __init__(self, *, images, preprocess, tokenizer, image_id: int, eoc_id: int, max_images: int,
                 max_tokens: int, image_size: int, seed: int, text_only: bool, name: str):
        if max_images < 1 or max_tokens < 4:
            raise ValueError(f"{name}: max_images={max_images} must be >= 1 and max_tokens={max_tokens} >= 4.")
        self._images, self._preprocess, self._tok = images, preprocess, tokenizer
        self._image_id, self._eoc_id = int(image_id), int(eoc_id)
        self._m, self._t, self._s = int(max_images), int(max_tokens), int(image_size)
        self._seed, self._text_only, self._name = int(seed), bool(text_only), name

    def _rng(self, j: int) -> np.random.Generator:
        return np.random.default_rng([self._seed, self._code, int(j)])

    def _example(self, chunks: list[Chunk], records: list[int], image_data=None) -> dict[str, np.ndarray]:
        """Encode, cut to T tokens and M images (chunks whose image would not fit are dropped).
        The m-th image is ``self._images[records[m]]``, or ``image_data[m]`` (encoded bytes) when given."""
        if self._text_only:
            chunks = [dataclasses.replace(c, image=False, end=False) for c in chunks]
        kept, n_img = [], 0
        for c in chunks:
            if c.image and n_img == self._m:
                break
            kept.append(c)
            n_img += int(c.image)
        ids = encode_interleaved(self._tok, kept, image_id=self._image_id, eoc_id=self._eoc_id, add_eos=True)
        if len(ids) > self._t:       # cut the text, keep the closing <|endofchunk|> <eos> of the last chunk kept
            tail = ids[-2:] if ids[-2:] == [self._eoc_id, self._tok.eos_id] else ids[-1:]
            ids = ids[:self._t - len(tail)] + tail
        n_img = sum(1 for t in ids if t == self._image_id)
        tokens = np.full((self._t,), self._tok.pad_id, np.int32)
        tokens[:len(ids)] = ids
        if self._text_only:
            return {"tokens": tokens}
        images = np.zeros((self._m, self._s, self._s, 3), np.float32)
        for m in range(n_img):
            images[m] = self._preprocess(image_data[m] if image_data is not None else self._images[records[m]])
        valid = np.arange(self._m) < n_img
        return {"tokens": tokens, "images": images, "media_valid": valid}


class CaptionDocSource(_DocSourceBase):
    """Pair j -> ``<bos> <image> caption <|endofchunk|> <eos>`` with image j's record (captions
    cycle: example j uses caption ``(j // R) mod len`` of record ``j mod R``)."""

    def __init__(self, captions: Sequence[Sequence[str]], **kw):
        super().__init__(name="CaptionDocSource", **kw)
        self._captions = captions
        self._n = sum(len(c) for c in captions)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j):
        j = int(j)
        r = j % len(self._captions)
        caps = self._captions[r]
        return self._example([Chunk(caps[(j // len(self._captions)) % len(caps)])], [r])

    def __repr__(self) -> str:
        return f"CaptionDocSource(records={len(self._captions)}, M={self._m}, T={self._t})"


class SyntheticDocSource(_DocSourceBase):
    """Document j: 1..M random records of the split, each ``<image> caption <|endofchunk|>``;
    after a chunk, with probability 1/4, a text-only filler sentence (no image, no
    ``<|endofchunk|>``: it is not trained, as open_flamingo's masking intends)."""

    _code = 1

    def __init__(self, captions: Sequence[Sequence[str]], num_docs: int, **kw):
        super().__init__(name="SyntheticDocSource", **kw)
        self._captions, self._n = captions, int(num_docs)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j):
        rng = self._rng(j)
        k = int(rng.integers(1, self._m + 1))
        records = [int(r) for r in rng.choice(len(self._captions), size=k, replace=False)]
        chunks = []
        for r in records:
            caps = self._captions[r]
            chunks.append(Chunk(caps[int(rng.integers(len(caps)))]))
            if rng.random() < 0.25:
                chunks.append(Chunk(FILLER[int(rng.integers(len(FILLER)))], image=False, end=False))
        return self._example(chunks, records)

    def __repr__(self) -> str:
        return f"SyntheticDocSource(docs={self._n}, M={self._m}, T={self._t})"


class QADocSource(_DocSourceBase):
    """Document j: 1..M random records of the split that have questions, each
    ``<image> Question: q Short answer: a <|endofchunk|>`` for one of its questions (``template``
    filled with the question and its answer). Text-only it is question-answer text in the LM's
    vocabulary: what stage 0 reads so that the frozen LM knows the VQA prompt format and the
    answer words (the paper's LM saw such text on the web); with images it is supervised VQA,
    which the paper's Flamingo never trains on (its mixture weight is 0 in `synthetic`)."""

    _code = 4

    def __init__(self, questions: Sequence[Sequence[dict]], num_docs: int, template: str, **kw):
        super().__init__(name="QADocSource", **kw)
        if template.count("{}") != 2:
            raise ValueError(f"QADocSource: template {template!r} needs two '{{}}' (question, answer).")
        self._records = [r for r, qs in enumerate(questions) if qs]
        if not self._records:
            raise ValueError("QADocSource: no record of the split has questions.")
        self._questions, self._n, self._template = questions, int(num_docs), template

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j):
        rng = self._rng(j)
        k = int(rng.integers(1, self._m + 1))
        records = [self._records[int(i)] for i in rng.choice(len(self._records), size=k, replace=False)]
        chunks = []
        for r in records:
            q = self._questions[r][int(rng.integers(len(self._questions[r])))]
            chunks.append(Chunk(self._template.format(q["question"], q["answer"])))
        return self._example(chunks, records)

    def __repr__(self) -> str:
        return f"QADocSource(docs={self._n}, M={self._m}, T={self._t})"


class Mmc4DocSource(_DocSourceBase):
    """Document j of a prepared `vlm_jax.data.mmc4.Mmc4Local` split: its images with similarity >=
    ``threshold`` interleaved with its sentences (`vlm_jax.data.mmc4.document_chunks`), at most M
    images and T tokens. A document left without an image above the threshold becomes its text
    alone (no image, hence no loss: open_flamingo drops such documents; here they cost one row)."""

    _code = 3

    def __init__(self, records, threshold: float, **kw):
        super().__init__(name="Mmc4DocSource", images=None, **kw)
        self._records, self._threshold = records, float(threshold)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, j):
        from vlm_jax.data.mmc4 import document_chunks
        ex = self._records[int(j)]          # `vlm_jax.data.mmc4.Mmc4Records`
        chunks, order = document_chunks(ex["texts"], ex["image_sentence"], ex["image_sim"], threshold=self._threshold,
                                        max_images=self._m)
        return self._example(chunks, [], image_data=[ex["images"][k] for k in order])

    def __repr__(self) -> str:
        return f"Mmc4DocSource(docs={len(self._records)}, threshold={self._threshold}, M={self._m}, T={self._t})"


class NonceEpisodeSource(_DocSourceBase):
    """Episode j: ``n_way`` colours drawn from those with single-object images, each bound to a
    fresh nonce word drawn from ``words`` (a new binding per episode), then M chunks
    ``<image> this is a <word> <|endofchunk|>`` of random single-object images of those colours.
    With ``text_only=True`` the colour word stands in for the image, just before the nonce word
    ("this is a red dax"): the text form of the same in-context binding (an induction pattern:
    after "red" comes what came after "red" before), which the synthetic LM is pretrained on; the
    gated cross-attention then has to make the image do what the colour word did."""

    _code = 2

    def __init__(self, by_color: dict[str, np.ndarray], words: Sequence[str], n_way: int, num_episodes: int,
                 **kw):
        super().__init__(name="NonceEpisodeSource", **kw)
        if n_way < 2 or n_way > len(by_color):
            raise ValueError(f"NonceEpisodeSource: n_way={n_way} must be in [2, {len(by_color)}] (the colours that "
                             "have single-object images).")
        if len(words) < n_way:
            raise ValueError(f"NonceEpisodeSource: {len(words)} nonce words for n_way={n_way}.")
        self._colors = sorted(by_color)
        self._by = by_color
        self._words, self._k, self._n = list(words), int(n_way), int(num_episodes)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, j):
        rng = self._rng(j)
        colors = [self._colors[int(i)] for i in rng.choice(len(self._colors), size=self._k, replace=False)]
        names = [self._words[int(i)] for i in rng.choice(len(self._words), size=self._k, replace=False)]
        chunks, records = [], []
        for _ in range(self._m):
            c = int(rng.integers(self._k))
            pool = self._by[colors[c]]
            records.append(int(pool[int(rng.integers(len(pool)))]))
            word = f"{colors[c]} {names[c]}" if self._text_only else names[c]
            chunks.append(Chunk(NONCE_TEMPLATE.format(word)))
        return self._example(chunks, records)

    def __repr__(self) -> str:
        return f"NonceEpisodeSource(episodes={self._n}, n_way={self._k}, words={len(self._words)}, M={self._m})"
