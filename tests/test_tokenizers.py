"""Tests of vlm_jax.data.pretrained_tokenizer against transformers on the same files.

The tokenizer.json fixtures are trained here with the `tokenizers` trainers on a few
sentences (nothing is downloaded): BERT WordPiece (BERT normaliser, pre-tokenizer and
[CLS] $A [SEP] template), OPT-style and GPT-2-style byte-level BPE, T5-style Unigram with
Metaspace and a $A </s> template.
"""
import json
import pickle

import numpy as np
import pytest
from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

from vlm_jax.data.pretrained_tokenizer import PretrainedTokenizer, TokenizerError
from vlm_jax.data.tokenizer_api import Tokenizer as TokenizerProtocol

CORPUS = ["A red circle is left of a blue square.", "Two dogs play in the park!",
          "The quick brown fox jumps over the lazy dog.",
          "Überraschung: café au lait, naïve résumé.", "a man riding a horse on a beach",
          "GPT-2 uses byte-level BPE; T5 uses SentencePiece."] * 3
TEXTS = ["A red dog jumps over the café!", "two  blue squares", "zebra xylophone qwerty",
         "a man <image> riding [DEC] a horse<|endofchunk|>", "", "ÜBER naïve 42"]
ADDED = ("[DEC]", "<image>", "<|endofchunk|>")


def _save(tok, d, config):
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def make_bert(d):
    t = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    t.normalizer = normalizers.BertNormalizer(lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.train_from_iterator(CORPUS, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    t.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", t.token_to_id("[CLS]")), ("[SEP]", t.token_to_id("[SEP]"))])
    t.decoder = decoders.WordPiece()
    return _save(t, d, {"tokenizer_class": "BertTokenizer", "cls_token": "[CLS]",
                        "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                        "mask_token": "[MASK]", "do_lower_case": True})


def make_byte_bpe(d, opt: bool):
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>"] if opt else ["<|endoftext|>"]
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if opt:   # OPT: </s> (its bos) before every text
        t.post_processor = processors.TemplateProcessing(
            single="</s> $A", pair="</s> $A </s> $B",
            special_tokens=[("</s>", t.token_to_id("</s>"))])
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>",
                  "eos_token": "</s>", "pad_token": "<pad>",
                  "unk_token": "</s>", "add_bos_token": True}
    else:
        t.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                  "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    d = _save(t, d, config)
    if opt:   # the Hugging Face special_tokens_map.json form: {"content": ..., ...} entries
        (d / "special_tokens_map.json").write_text(json.dumps({
            k: {"content": config[k], "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False} for k in ("bos_token", "eos_token", "pad_token")}))
    return d


def make_t5(d):
    t = Tokenizer(models.Unigram())
    t.normalizer = normalizers.Replace(Regex(" {2,}"), " ")   # as in t5-base
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    t.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    t.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    t.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>",
        special_tokens=[("</s>", t.token_to_id("</s>"))])
    return _save(t, d, {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>",
                        "pad_token": "<pad>", "unk_token": "<unk>", "extra_ids": 0})


FAMILIES = ("bert", "opt", "gpt2", "t5")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"bert": make_bert(root / "bert"), "opt": make_byte_bpe(root / "opt", True),
            "gpt2": make_byte_bpe(root / "gpt2", False), "t5": make_t5(root / "t5")}


def oracle(family, d, added=()):
    import transformers
    cls = {"bert": transformers.BertTokenizerFast, "opt": transformers.GPT2TokenizerFast,
           "gpt2": transformers.GPT2TokenizerFast, "t5": transformers.T5TokenizerFast}[family]
    hf = cls.from_pretrained(str(d))
    if added:
        hf.add_special_tokens({"additional_special_tokens": list(added)})
    return hf


TEMPLATE = {"bert": ([2], [3]), "opt": ([2], []), "gpt2": ([], []), "t5": ([], [1])}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("template", ["auto", "named"])
def test_matches_transformers(dirs, family, template):
    tok = PretrainedTokenizer.from_dir(dirs[family], added_tokens=ADDED,
                                       template=family if template == "named" else "auto")
    hf = oracle(family, dirs[family], ADDED)
    assert isinstance(tok, TokenizerProtocol)
    # the family template, with the ids these fixtures give the specials
    prefix, suffix = TEMPLATE[family]
    assert tok.template == (tuple(prefix), tuple(suffix))
    before = len(oracle(family, dirs[family]))
    assert tok.vocab_size == len(hf) == before + 3 and tok.num_added == 3
    assert [tok.token_id(t) for t in ADDED] == [before, before + 1, before + 2]
    assert [tok.token_id(t) for t in ADDED] == hf.convert_tokens_to_ids(list(ADDED))
    assert tok.eos_id == (hf.sep_token_id if family == "bert" else hf.eos_token_id)
    assert tok.bos_id == hf.bos_token_id                 # None for BERT and T5
    assert tok.pad_id == (hf.eos_token_id if family == "gpt2" else hf.pad_token_id)
    for text in TEXTS:
        with_specials = hf(text)["input_ids"]
        plain = hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text) == with_specials, text
        assert tok.encode(text, add_special_tokens=False) == plain, text
        assert tok.encode(text) == prefix + plain + suffix
        if "<image>" in text:
            assert tok.token_id("<image>") in plain and tok.token_id("[DEC]") in plain
        for skip in (True, False):
            assert tok.decode(with_specials, skip_special_tokens=skip) == hf.decode(
                with_specials, skip_special_tokens=skip), (text, skip)
    # the added tokens are special: skipped by decode
    ids = tok.encode("a horse<|endofchunk|>")
    assert "<|endofchunk|>" not in tok.decode(ids)
    assert "<|endofchunk|>" in tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation_and_padding_match_transformers(dirs, family):
    tok = PretrainedTokenizer.from_dir(dirs[family])
    hf = oracle(family, dirs[family])
    if family == "gpt2":
        hf.pad_token = hf.eos_token  # GPT-2 has no pad token; ours pads with eos
    long_text = "The quick brown fox jumps over the lazy dog. " * 3
    prefix, suffix = TEMPLATE[family]
    for length in (4, 7, 12):
        want = hf(long_text, max_length=length, truncation=True, padding="max_length")
        got = tok.encode_padded(long_text, length)
        assert got.dtype == np.int32 and got.shape == (length,)
        assert got.tolist() == want["input_ids"]
        if suffix:   # the closing token survives truncation
            assert got[-1] == suffix[0]
        short = tok.encode_padded("a dog", length)
        n = len(tok.encode("a dog"))
        assert short[:n].tolist() == tok.encode("a dog") and np.all(short[n:] == tok.pad_id)
    rows = [tok.encode(t) for t in ("a red circle", "two dogs play in the park", "x")]
    for side in ("right", "left"):
        ids, mask = tok.pad_batch(rows, 10, side=side)
        want = hf(["a red circle", "two dogs play in the park", "x"], max_length=10,
                  truncation=True, padding="max_length", padding_side=side)
        assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == (3, 10)
        assert ids.tolist() == want["input_ids"]
        assert mask.tolist() == np.asarray(want["attention_mask"], bool).tolist()
    # a row longer than the batch length is cut and keeps the template's closing token
    ids, mask = tok.pad_batch([tok.encode(long_text)], 6)
    assert ids[0].tolist() == tok.encode(long_text, max_len=6) and mask.all()


def test_tokenizer_pickles_for_grain_workers(dirs):
    tok = PretrainedTokenizer.from_dir(dirs["bert"], added_tokens=("[DEC]",))
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(TEXTS[3]) == tok.encode(TEXTS[3]) and again.token_id("[DEC]") == tok.vocab_size - 1


def test_errors(dirs, tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer directory"):
        PretrainedTokenizer.from_dir(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="has no tokenizer.json.*save_pretrained"):
        PretrainedTokenizer.from_dir(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    good = (dirs["bert"] / "tokenizer.json").read_text()
    (bad / "tokenizer.json").write_text(good[:len(good) // 2])          # truncated file
    with pytest.raises(TokenizerError, match=r"bad/tokenizer.json: cannot read"):
        PretrainedTokenizer.from_dir(bad)
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))  # not one
    with pytest.raises(TokenizerError, match="is not a valid tokenizer.json"):
        PretrainedTokenizer.from_dir(bad)
    (bad / "tokenizer.json").write_text(good)
    (bad / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: cannot read"):
        PretrainedTokenizer.from_dir(bad)
    (bad / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    with pytest.raises(TokenizerError, match="no token '<eos>'.*eos_token"):
        PretrainedTokenizer.from_dir(bad)
    with pytest.raises(TokenizerError, match=r"'\[SEP\]' already exists .*id 3"):
        PretrainedTokenizer.from_dir(dirs["bert"], added_tokens=("[DEC]", "[SEP]"))
    with pytest.raises(TokenizerError, match="listed twice"):
        PretrainedTokenizer.from_dir(dirs["bert"], added_tokens=("[DEC]", "[DEC]"))
    with pytest.raises(TokenizerError, match="sequence of tokens"):
        PretrainedTokenizer.from_dir(dirs["bert"], added_tokens="[DEC]")
    with pytest.raises(TokenizerError, match="'bert' template needs a cls_token.*'\\[CLS\\]'"):
        PretrainedTokenizer.from_dir(dirs["gpt2"], template="bert")
    with pytest.raises(TokenizerError, match="'t5' template needs a eos_token"):
        PretrainedTokenizer.from_dir(dirs["bert"], template="t5")
    with pytest.raises(TokenizerError, match="template='llama'"):
        PretrainedTokenizer.from_dir(dirs["bert"], template="llama")
    tok = PretrainedTokenizer.from_dir(dirs["t5"])
    with pytest.raises(TokenizerError, match="'<image>' is not in the vocabulary.*added_tokens"):
        tok.token_id("<image>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(ValueError, match="no room"):
        tok.encode_padded("a dog", 1)
