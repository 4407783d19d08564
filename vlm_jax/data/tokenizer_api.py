"""The interface every tokenizer of vlm_jax offers, and the template / padding logic they share.

Legend of dimension letters: B batch (number of texts), T padded token length.

Implementations: `WordTokenizer` (tokenizer.py, word-level, built from captions) and
`PretrainedTokenizer` (pretrained_tokenizer.py, a Hugging Face tokenizer.json). A tokenizer
has a *template*: ids put before (`prefix`) and after (`suffix`) the text's own ids when
`add_special_tokens=True`:

  WordTokenizer          <bos> .. <eos>
  BERT WordPiece         [CLS] .. [SEP]
  OPT byte-level BPE     </s> ..            (OPT's bos is </s>, the same id as its eos)
  GPT-2 byte-level BPE   ..                 (no specials)
  T5 Unigram             .. </s>

Truncation to `max_len` cuts the text's ids and keeps the whole template, so the closing
special token (<eos> / [SEP] / </s>) is always the last real token.
"""
from __future__ import annotations

from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipelines and tasks may rely on."""

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (ids are in [0, vocab_size))."""

    @property
    def pad_id(self) -> int:
        """Id written into padding positions (the mask tells padding from text)."""

    @property
    def bos_id(self) -> int | None:
        """Id that starts a decoder sequence, None when the family has none (BERT, T5)."""

    @property
    def eos_id(self) -> int:
        """Id that ends a sequence (generation stops there)."""

    def encode(self, text: str, add_special_tokens: bool = True,
               max_len: int | None = None) -> list[int]:
        """Text -> ids [<= max_len], with the template when add_special_tokens."""

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text; skip_special_tokens drops pad / template / added special tokens."""

    def encode_padded(self, text: str, max_len: int) -> np.ndarray:
        """Text -> int32 [max_len]: template, truncated, right-padded with pad_id."""

    def pad_batch(self, seqs: Sequence[Sequence[int]], length: int,
                  side: str = "right") -> tuple[np.ndarray, np.ndarray]:
        """Id lists -> (ids int32 [B, T], mask bool [B, T]), T = length."""


class TemplateTokenizerBase:
    """encode / encode_padded / pad_batch over a subclass's `_text_ids(text) -> list[int]`,
    `_prefix: tuple[int, ...]`, `_suffix: tuple[int, ...]` and `pad_id`."""

    _prefix: tuple[int, ...] = ()
    _suffix: tuple[int, ...] = ()

    def _text_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    @property
    def template(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix ids, suffix ids) added by encode(add_special_tokens=True)."""
        return self._prefix, self._suffix

    def encode(self, text: str, add_special_tokens: bool = True,
               max_len: int | None = None) -> list[int]:
        """Text -> ids: prefix + text ids + suffix (without add_special_tokens: text ids only).

        max_len: keep at most max_len ids; the text ids are cut, the template is kept whole
        (ValueError when max_len leaves no room for any text id).
        """
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if not isinstance(text, str):
            raise TypeError(f"encode: expected a str, got {type(text).__name__}.")
        ids = self._text_ids(text)
        prefix, suffix = (self._prefix, self._suffix) if add_special_tokens else ((), ())
        if max_len is not None:
            room = max_len - len(prefix) - len(suffix)
            if room < 1:
                raise ValueError(f"max_len={max_len} leaves no room for text after the "
                                 f"{len(prefix) + len(suffix)} template tokens; use max_len >= "
                                 f"{len(prefix) + len(suffix) + 1}.")
            ids = ids[:room]
        return list(prefix) + list(ids) + list(suffix)

    def encode_padded(self, text: str, max_len: int) -> np.ndarray:
        """Text -> int32 [max_len] = prefix + text ids (cut to fit) + suffix + pad_id..."""
        ids = self.encode(text, max_len=max_len)
        out = np.full((max_len,), self.pad_id, np.int32)
        out[:len(ids)] = ids
        return out

    def pad_batch(self, seqs: Sequence[Sequence[int]], length: int,
                  side: str = "right") -> tuple[np.ndarray, np.ndarray]:
        """Id lists -> (ids int32 [B, T], mask bool [B, T]) with T = length.

        Rows longer than `length` are cut at the end; a row that ends with this tokenizer's
        template suffix (e.g. [SEP], </s>, <eos>) keeps it. side='right' pads after the ids
        (encoder inputs, training targets), side='left' before them (decoder prompts that
        generation continues). mask is True on real ids.
        """
        return pad_id_lists(seqs, length, pad_id=self.pad_id, side=side, keep_suffix=self._suffix)


def pad_id_lists(seqs: Sequence[Sequence[int]], length: int, *, pad_id: int, side: str = "right",
                 keep_suffix: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The padding of `TemplateTokenizerBase.pad_batch`, for any pad id and closing suffix."""
    if side not in ("right", "left"):
        raise ValueError(f"pad_batch: side={side!r}; use 'right' or 'left'.")
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"pad_batch: length={length!r} must be a positive int.")
    suffix = list(keep_suffix)
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, row in enumerate(seqs):
        row = [int(t) for t in row]
        if len(row) > length:
            ends = bool(suffix) and len(suffix) < length and row[-len(suffix):] == suffix
            row = row[:length - len(suffix)] + suffix if ends else row[:length]
        n = len(row)
        if side == "right":
            ids[i, :n], mask[i, :n] = row, True
        elif n:
            ids[i, length - n:], mask[i, length - n:] = row, True
    return ids, mask
