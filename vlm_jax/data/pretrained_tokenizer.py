"""Pretrained subword tokenizers read from a local Hugging Face `tokenizer.json` directory.

Legend of dimension letters: B batch (number of texts), T padded token length.

`PretrainedTokenizer.from_dir(path, *, added_tokens=(), template='auto')` reads

  <path>/tokenizer.json           the `tokenizers` (Rust) serialisation: normaliser,
                                  pre-tokenizer, model (WordPiece / BPE / Unigram), decoder and
                                  post-processor; required
  <path>/special_tokens_map.json  optional: pad/bos/eos/cls/sep/unk token names
  <path>/tokenizer_config.json    optional: the same names (wins over special_tokens_map.json)

and implements the `Tokenizer` protocol of vlm_jax/data/tokenizer_api.py. Nothing is
downloaded. Supported (and tested against transformers on the same files): BERT WordPiece,
GPT-2 / OPT byte-level BPE, T5 SentencePiece Unigram.

Template (what encode(add_special_tokens=True) puts around the text ids):
  template='auto'  read from tokenizer.json's post-processor (the Hugging Face behaviour)
  'bert'           [cls_token] .. [sep_token]      ([CLS] .. [SEP])
  'opt'            [bos_token] ..                  (</s> ..; OPT's bos is </s>)
  'gpt2'           ..                              (nothing added)
  't5'             .. [eos_token]                  (.. </s>)
Truncation (max_len) cuts the text ids and keeps the template, so the closing token stays.

Special ids: pad_id = pad_token (GPT-2 has none: eos_id is used, the mask tells padding apart);
bos_id = bos_token or None (BERT, T5); eos_id = eos_token, else sep_token (BERT);
cls_id / sep_id / unk_id where the files name them (else None).

added_tokens: new special tokens (e.g. '[DEC]' for BLIP-2's Q-Former, '<image>' and
'<|endofchunk|>' for Flamingo) get the ids vocab_size_before, vocab_size_before + 1, ... in the
order given; vocab_size counts them, num_added is their number and token_id(tok) their id.
decode(skip_special_tokens=True) drops them like the other special tokens. A model's
embedding table must have at least `vocab_size` rows.

Errors are `TokenizerError` (a ValueError) naming the path and the fix.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np

from vlm_jax.data.tokenizer_api import TemplateTokenizerBase

TEMPLATES = ("auto", "bert", "opt", "gpt2", "t5")
_FAMILY_TEMPLATE = {"bert": (("cls_token",), ("sep_token",)), "opt": (("bos_token",), ()),
                    "gpt2": ((), ()), "t5": ((), ("eos_token",))}
_ROLES = ("pad_token", "bos_token", "eos_token", "cls_token", "sep_token", "unk_token")
_FIX_SAVE = ("re-save the tokenizer with transformers' `AutoTokenizer.from_pretrained(<model>)"
             ".save_pretrained(<dir>)` on a machine that has the model")


class TokenizerError(ValueError):
    """A tokenizer directory, file or token that cannot be used (the message says the fix)."""


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read the {what} ({e}); {_FIX_SAVE}, or delete "
                             "the file if it is optional.") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: the {what} must be a JSON object, got "
                             f"{type(data).__name__}; {_FIX_SAVE}.")
    return data


def _token_name(value) -> str | None:
    """A special-token entry of tokenizer_config.json: "[CLS]" or {"content": "[CLS]", ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class PretrainedTokenizer(TemplateTokenizerBase):
    """A tokenizer.json tokenizer with a family template and optional added special tokens."""

    def __init__(self, tokenizer, *, path: str = "", names: dict[str, str] | None = None,
                 added_tokens: Sequence[str] = (), template: str = "auto"):
        """tokenizer: a `tokenizers.Tokenizer`; names: role ('pad_token', ...) -> token text.
        Prefer `from_dir`."""
        if template not in TEMPLATES:
            raise TokenizerError(f"template={template!r}: use one of {TEMPLATES}.")
        self._tok, self.path = tokenizer, path
        self._tok.no_truncation()   # encode returns every id; truncation is ours (max_len)
        self._tok.no_padding()
        where = f"{path}/tokenizer.json" if path else "the tokenizer"
        names = dict(names or {})
        self.added_tokens = self._add_tokens(added_tokens, where)

        def role_id(role):
            name = names.get(role)
            if name is None:
                return None
            i = self._tok.token_to_id(name)
            if i is None:
                raise TokenizerError(
                    f"{where} has no token {name!r}, which the tokenizer config names as "
                    f"{role}; fix {role} in {path}/tokenizer_config.json (or "
                    "special_tokens_map.json) or use the matching tokenizer.json.")
            return i

        ids = {role: role_id(role) for role in _ROLES}
        self.cls_id, self.sep_id, self.unk_id = ids["cls_token"], ids["sep_token"], ids["unk_token"]
        self._bos_id = ids["bos_token"]
        self._eos_id = ids["eos_token"] if ids["eos_token"] is not None else ids["sep_token"]
        if self._eos_id is None:
            raise TokenizerError(f"{where}: no eos_token (or sep_token) is named; add "
                                 f"\"eos_token\" to {path}/tokenizer_config.json.")
        self._pad_id = ids["pad_token"] if ids["pad_token"] is not None else self._eos_id
        self.template_name = template
        if template == "auto":
            self._prefix, self._suffix = self._post_processor_template(where)
        else:
            def template_ids(roles):
                out = []
                for role in roles:
                    if ids[role] is None:
                        default = _DEFAULT_NAMES[template][role]
                        i = self._tok.token_to_id(default)
                        if i is None:
                            raise TokenizerError(
                                f"{where}: the {template!r} template needs a {role} "
                                f"(default {default!r}), which the vocabulary lacks; name it "
                                f"in {path}/tokenizer_config.json or pick another template "
                                f"({TEMPLATES}).")
                        out.append(i)
                    else:
                        out.append(ids[role])
                return tuple(out)
            pre, suf = _FAMILY_TEMPLATE[template]
            self._prefix, self._suffix = template_ids(pre), template_ids(suf)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str, *, added_tokens: Sequence[str] = (),
                 template: str = "auto") -> "PretrainedTokenizer":
        """Loads `<path>/tokenizer.json` (+ the optional config files), see the module doc."""
        from tokenizers import Tokenizer as RustTokenizer
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise TokenizerError(
                f"{path}: no such tokenizer directory; point it at a local folder holding "
                f"tokenizer.json (e.g. a Hugging Face model snapshot; {_FIX_SAVE}).")
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise TokenizerError(
                f"{path} has no tokenizer.json (found: {sorted(os.listdir(path))[:10]}); "
                f"{_FIX_SAVE} (a slow-only tokenizer with vocab.txt / spiece.model is converted "
                "to tokenizer.json by that call).")
        _read_json(file, "tokenizer.json")
        try:
            tok = RustTokenizer.from_file(file)
        except Exception as e:  # the Rust side raises a plain Exception on bad content
            raise TokenizerError(f"{file} is not a valid tokenizer.json ({e}); {_FIX_SAVE}.") from e
        names: dict[str, str] = {}
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):
            f = os.path.join(path, fname)
            if os.path.isfile(f):
                data = _read_json(f, fname)
                for role in _ROLES:
                    name = _token_name(data.get(role))
                    if name is not None:
                        names[role] = name
        return cls(tok, path=path, names=names, added_tokens=added_tokens, template=template)

    def _add_tokens(self, added: Sequence[str], where: str) -> tuple[str, ...]:
        from tokenizers import AddedToken
        if isinstance(added, str):
            raise TokenizerError(f"added_tokens={added!r}: pass a sequence of tokens, e.g. "
                                 f"({added!r},).")
        added = tuple(added)
        for t in added:
            if not isinstance(t, str) or not t or t != t.strip():
                raise TokenizerError(f"added token {t!r}: must be a non-empty str without "
                                     "surrounding whitespace.")
            if added.count(t) > 1:
                raise TokenizerError(f"added token {t!r} is listed twice; list it once.")
            existing = self._tok.token_to_id(t)
            if existing is not None:
                raise TokenizerError(f"added token {t!r} already exists in {where} (id "
                                     f"{existing}); drop it from added_tokens (use "
                                     "token_id() to look its id up).")
        for t in added:
            expected = self._tok.get_vocab_size(with_added_tokens=True)
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
            if self._tok.token_to_id(t) != expected:  # ids must extend the vocabulary
                raise TokenizerError(f"{where}: added token {t!r} got id "
                                     f"{self._tok.token_to_id(t)}, not the next free id "
                                     f"{expected}; the vocabulary has holes, re-save it.")
        return added

    def _post_processor_template(self, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prefix, suffix) that tokenizer.json's post-processor adds to a probe text."""
        probe = "a"
        plain = self._tok.encode(probe, add_special_tokens=False).ids
        enc = self._tok.encode(probe, add_special_tokens=True)
        full, special = enc.ids, enc.special_tokens_mask
        n_pre = next((i for i, s in enumerate(special) if not s), len(full))
        n_suf = len(full) - n_pre - len(plain)
        if not plain or n_suf < 0 or full[n_pre:n_pre + len(plain)] != plain:
            raise TokenizerError(f"{where}: cannot read the special-token template of its "
                                 "post-processor; pass template= one of "
                                 f"{TEMPLATES[1:]}.")
        return tuple(full[:n_pre]), tuple(full[n_pre + len(plain):])

    # ------------------------------------------------------------------ protocol
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def num_added(self) -> int:
        return len(self.added_tokens)

    def token_id(self, token: str) -> int:
        """Id of a vocabulary or added token; TokenizerError when absent."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary of "
                                 f"{self.path or 'this tokenizer'}; add it with "
                                 "from_dir(..., added_tokens=(...)).")
        return i

    def id_to_token(self, idx: int) -> str:
        tok = self._tok.id_to_token(int(idx))
        if tok is None:
            raise ValueError(f"id {idx} outside the vocabulary [0, {self.vocab_size}).")
        return tok

    def _text_ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text (tokenizer.json's decoder, as transformers' decode). Text after an eos
        is kept: cut generated ids at eos_id first."""
        ids = np.asarray(ids).reshape(-1).tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: ids {bad[:5]} outside the vocabulary "
                             f"[0, {self.vocab_size}).")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return (f"PretrainedTokenizer({self.path!r}, vocab_size={self.vocab_size}, "
                f"added={self.added_tokens}, template={self.template_name!r})")


_DEFAULT_NAMES = {
    "bert": {"cls_token": "[CLS]", "sep_token": "[SEP]"},
    "opt": {"bos_token": "</s>"},
    "gpt2": {},
    "t5": {"eos_token": "</s>"},
}
