"""Word-level caption tokenizer (implements vlm_jax/data/tokenizer_api.py's Tokenizer).

Legend of dimension letters: T padded token length (max words + 2 for <bos>/<eos>).

Template: <bos> w1 .. wn <eos>; decode stops at the first <eos>.

Normalisation: lowercase; hyphens and slashes become spaces; every other character that is
neither a letter, a digit, an underscore nor whitespace is removed ("don't" -> "dont",
"red, blue." -> "red blue"); split on whitespace.

Special ids are fixed: <pad>=0, <bos>=1, <eos>=2, <unk>=3; words follow in order of
decreasing training count (ties alphabetical), so a vocabulary is a pure function of the
training captions, `min_count` and `max_size`.
"""
from __future__ import annotations

import collections
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from vlm_jax.data.tokenizer_api import TemplateTokenizerBase

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_FORMAT_VERSION = 1
_SEPARATORS = re.compile(r"[-/:]")           # word separators (punctuation elsewhere is dropped)
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> list[str]:
    """Caption text -> list of lowercase words without punctuation."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return _PUNCT.sub("", _SEPARATORS.sub(" ", text.lower())).split()


class WordTokenizer(TemplateTokenizerBase):
    """Vocabulary of words + the four specials. Build with `WordTokenizer.build(captions)`."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    _prefix, _suffix = (1,), (2,)

    def __init__(self, words: Sequence[str]):
        """`words`: vocabulary words in id order (ids 4, 5, ...), without specials."""
        words = list(words)
        clash = [w for w in words if w in SPECIALS]
        if clash:
            raise ValueError(f"WordTokenizer: words {clash} clash with the special tokens "
                             f"{SPECIALS}; remove them from the word list.")
        if len(set(words)) != len(words):
            dup = [w for w, c in collections.Counter(words).items() if c > 1][:5]
            raise ValueError(f"WordTokenizer: duplicate words in the vocabulary, e.g. {dup}.")
        self._itos = list(SPECIALS) + words
        self._stoi = {w: i for i, w in enumerate(self._itos)}

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, captions: Iterable[str], *, min_count: int = 1,
              max_size: int | None = None) -> "WordTokenizer":
        """Vocabulary from training captions.

        min_count: a word needs at least this many occurrences.
        max_size: cap on vocab_size INCLUDING the 4 specials (None or 0 = no cap); the most
          frequent words are kept.
        """
        if min_count < 1:
            raise ValueError(f"WordTokenizer.build: min_count={min_count} must be >= 1.")
        if max_size is not None and max_size != 0 and max_size <= len(SPECIALS):
            raise ValueError(f"WordTokenizer.build: max_size={max_size} must exceed the "
                             f"{len(SPECIALS)} special tokens (or be 0 for no cap).")
        counts = collections.Counter()
        for c in captions:
            counts.update(normalize(c))
        for s in SPECIALS:  # '<unk>' normalises to 'unk', but be safe
            counts.pop(s, None)
        words = sorted((w for w, n in counts.items() if n >= min_count),
                       key=lambda w: (-counts[w], w))
        if max_size:
            words = words[:max_size - len(SPECIALS)]
        return cls(words)

    # -------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def words(self) -> list[str]:
        """All tokens in id order, specials first."""
        return list(self._itos)

    def word_to_id(self, word: str) -> int:
        return self._stoi.get(word, self.unk_id)

    def id_to_word(self, idx: int) -> str:
        return self._itos[idx]

    # --------------------------------------------------------- encode / decode
    def _text_ids(self, text: str) -> list[int]:
        """Caption -> word ids (unknown words -> unk_id), no specials."""
        return [self._stoi.get(w, self.unk_id) for w in normalize(text)]

    # encode(text, add_special_tokens=True, max_len=None) -> <bos> w.. <eos>,
    # encode_padded(text, max_len) -> int32 [max_len] = <bos> w1..wn <eos> <pad>... (words cut
    # to max_len - 2, <eos> always kept) and pad_batch come from TemplateTokenizerBase.

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text.

        skip_special_tokens=True: stops at the first <eos>, drops <pad> and <bos>; <unk> stays
        '<unk>'. False: every id's token, specials included, space-separated.
        """
        words = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if skip_special_tokens and i == self.eos_id:
                break
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"decode: id {i} outside the vocabulary [0, {self.vocab_size}).")
            if skip_special_tokens and i in (self.pad_id, self.bos_id):
                continue
            words.append(self._itos[i])
        return " ".join(words)

    # ------------------------------------------------------------------ storage
    def save(self, path: str) -> None:
        """Writes JSON atomically (temp file + rename), so concurrent writers are safe."""
        data = {"format": "vlm_jax.WordTokenizer", "version": _FORMAT_VERSION,
                "specials": list(SPECIALS), "words": self._itos[len(SPECIALS):]}
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=0)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "WordTokenizer":
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != "vlm_jax.WordTokenizer" or list(data.get("specials", ())) != list(SPECIALS):
            raise ValueError(f"{path} is not a vlm_jax WordTokenizer vocabulary (expected "
                             f"format 'vlm_jax.WordTokenizer' with specials {SPECIALS}); "
                             "delete it to rebuild the vocabulary from the training captions.")
        return cls(data["words"])

    def __eq__(self, other) -> bool:
        return isinstance(other, WordTokenizer) and self._itos == other._itos

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"
