"""Text-only documents that teach a small LM to read a description in its context: the stand-in,
on the synthetic set, for what BLIP-2 borrows from a web-pretrained LLM.

BLIP-2's stage 2 puts the Q-Former's query outputs in front of a *frozen* LLM as a soft prefix
and trains only the prefix to make the LLM continue with the caption; zero-shot VQA then works
because the LLM already answers questions about whatever its context describes. No such LM
exists offline, so the synthetic stage 0 (`configs/blip2.py:lm_opt_synthetic`) trains the LM
on documents in which a caption of an image sits exactly where the prefix will sit, before the
``<bos>`` that starts the text (dimension letter T: padded token length)::

    describe    caption_i <bos> caption_j <eos>                  (another caption of the same image)
    restate     caption_i <bos> caption_i' <eos>                 (the same caption in other words:
                                                                  ``rewrite``, below; only captions
                                                                  it can reword)
    qa_context  caption_i <bos> Question: q Short answer: a <eos>   (one of the image's questions)
    caption     <bos> caption_i <eos>                            (the caption prior: no context)
    qa          <bos> Question: q Short answer: a <eos>          (what the question alone gives:
                                                                  the blind baseline's knowledge)

Stage 2 then has to make the image prefix do what the caption did (as the nonce episodes of
`vlm_jax.data.interleaved` make an image do what a colour word did). The answer to a question
is in the context only when that caption mentions it (captions differ in what they say): with
``evidence`` (a dataset's ``answer_evidence(question, captions) -> caption indices``, e.g.
`vlm_jax.data.synthetic.answer_evidence`; config ``data.text.qa_context_caption='stating'``)
a ``qa_context`` document's context is one of the captions that state the answer whenever some
do (position and relation questions on the synthetic set, which only some captions answer),
as a reading-comprehension corpus pairs questions with the passage that answers them;
otherwise (``'random'``) any caption of the image, and the LM learns what it can. With
``paraphrase=p`` and ``rewrite`` (a dataset's ``(caption, rng) -> another wording or None``, e.g.
`vlm_jax.data.synthetic.paraphrase_location`; config ``data.text.paraphrase``), a document's
context and its describe target are each, with probability p, said another way (clauses
reordered, the place first ...), so what the LM learns to read is what the text says, not
where its words sit.

For an encoder-decoder LM (T5, ``layout='seq2seq'``; `configs/blip2.py:lm_t5_synthetic`) the
same documents are split the way BLIP-2's T5 stage 2 splits its input (prefix-LM: the prefix and
the prompt go to the encoder, the decoder generates the rest), with the caption in the
prefix's place at the start of the encoder input (Te encoder, Td decoder tokens)::

    describe    encoder: caption_i <bos>                          decoder: caption_j <eos>
    qa_context  encoder: caption_i <bos> Question: q Short answer:   decoder: a <eos>
    caption     encoder: <bos>                                    decoder: caption_i <eos>
    qa          encoder: <bos> Question: q Short answer:           decoder: a <eos>

`ContextTextSource(kind=...)` is a grain random-access source: index -> {tokens i32[T]}
(decoder layout; seq2seq: {enc_tokens i32[Te], tokens i32[Td]}, the decoder's targets),
deterministic per index, cut to length keeping the closing ``<eos>`` (and the encoder's
``<bos>`` + prompt: the context gives way first).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

__all__ = ["KINDS", "LAYOUTS", "ContextTextSource"]

KINDS = ("describe", "qa_context", "caption", "qa", "restate")
LAYOUTS = ("decoder", "seq2seq")


class ContextTextSource:
    """Documents of one ``kind`` (module doc) drawn from the records of a split.

    captions: per record, its captions; questions: per record, dicts with 'question', 'answer'
    (records without questions are skipped by the QA kinds); template: the QA text with two
    '{}' (question, answer), the VQA evaluator's prompt + answer; evidence: optional
    ``(question dict, captions) -> indices of the captions that state the answer`` (module doc;
    qa_context only); tokenizer: a
    `vlm_jax.data.tokenizer.WordTokenizer`-like object (bos_id, eos_id, pad_id,
    ``encode(text, add_special_tokens=False)``); layout: 'decoder' (one sequence of
    ``max_tokens``) | 'seq2seq' (encoder ``max_tokens``, decoder ``max_target_tokens``; module doc).
    paraphrase / rewrite: the probability that the context (and a describe target) is reworded by
    ``rewrite(text, rng) -> text or None`` (None: kept as it is; module doc).
    """

    _codes = {k: i for i, k in enumerate(KINDS)}

    def __init__(self, kind: str, captions: Sequence[Sequence[str]], questions: Sequence[Sequence[dict]], *,
                 tokenizer, template: str, max_tokens: int, num_docs: int, seed: int,
                 evidence: Callable[[dict, Sequence[str]], Sequence[int]] | None = None,
                 layout: str = "decoder", max_target_tokens: int = 0, paraphrase: float = 0.0,
                 rewrite: Callable[[str, np.random.Generator], str | None] | None = None):
        if kind not in KINDS:
            raise ValueError(f"ContextTextSource: kind={kind!r} is not one of {KINDS}.")
        if layout not in LAYOUTS:
            raise ValueError(f"ContextTextSource: layout={layout!r} is not one of {LAYOUTS}.")
        if layout == "seq2seq" and max_target_tokens < 2:
            raise ValueError(f"ContextTextSource: layout='seq2seq' needs max_target_tokens >= 2 (got "
                             f"{max_target_tokens}).")
        self.layout, self._td = layout, int(max_target_tokens)
        if not 0.0 <= paraphrase <= 1.0 or (paraphrase > 0 and rewrite is None):
            raise ValueError(f"ContextTextSource: paraphrase={paraphrase} must lie in [0, 1] and needs a rewrite "
                             "function (e.g. vlm_jax.data.synthetic.paraphrase_location).")
        self._paraphrase, self._rewrite = float(paraphrase), rewrite
        if template.count("{}") != 2:
            raise ValueError(f"ContextTextSource: template {template!r} needs two '{{}}' (question, answer).")
        if max_tokens < 4:
            raise ValueError(f"ContextTextSource: max_tokens={max_tokens} must be >= 4.")
        self.kind, self._caps, self._qs, self._tok = kind, captions, questions, tokenizer
        self._template, self._t, self._n, self._seed = template, int(max_tokens), int(num_docs), int(seed)
        self._evidence = evidence
        if kind == "restate" and rewrite is None:
            raise ValueError("ContextTextSource(restate): needs a rewrite function (e.g. "
                             "vlm_jax.data.synthetic.paraphrase_location).")
        if kind == "restate":                          # (record, caption) pairs the rewrite accepts and that fit
            probe = np.random.default_rng(0)           # twice in max_tokens (a rewording adds <= 2 words a clause)
            fits = lambda c: 2 * (len(tokenizer.encode(c, add_special_tokens=False)) + 2 * (c.count(",") + 1)) + 2 \
                <= max_tokens                                                                     # noqa: E731
            self._restatable = [(r, i) for r, cs in enumerate(captions) for i, c in enumerate(cs)
                                if fits(c) and rewrite(c, probe) is not None]
            self._records = sorted({r for r, _ in self._restatable})
        elif kind in ("qa", "qa_context"):
            self._records = [r for r, qs in enumerate(questions) if qs]
        else:
            self._records = [r for r, cs in enumerate(captions) if cs]
        if not self._records:
            raise ValueError(f"ContextTextSource({kind}): no record of the split has "
                             f"{'questions' if 'qa' in kind else 'captions the rewrite can reword' if kind == 'restate' else 'captions'}.")

    def __len__(self) -> int:
        return self._n

    def text(self, j: int) -> tuple[str, str]:
        """Document j as (context, text): the context is '' for 'caption' and 'qa'."""
        context, text, _ = self._draw(j)
        return context, text

    def parts(self, j: int) -> tuple[str, str, str]:
        """Document j as (context, prompt, target), the seq2seq split: for the QA kinds the prompt
        is the template up to the answer ("Question: q Short answer:") and the target the answer;
        otherwise the prompt is '' and the target the text."""
        context, text, q = self._draw(j)
        if q is None:
            return context, "", text
        head = self._template.rsplit("{}", 1)[0]
        return context, head.format(q["question"]).strip(), str(q["answer"])

    def _draw(self, j: int) -> tuple[str, str, dict | None]:
        rng = np.random.default_rng([self._seed, self._codes[self.kind], int(j)])
        if self.kind == "restate":
            r, i = self._restatable[int(rng.integers(len(self._restatable)))]
            caption = self._caps[r][i]
            return self._reword(caption, rng), self._rewrite(caption, rng), None
        r = self._records[int(rng.integers(len(self._records)))]
        caps = self._caps[r]
        i = int(rng.integers(len(caps)))
        q = None
        if self.kind in ("qa", "qa_context"):
            q = self._qs[r][int(rng.integers(len(self._qs[r])))]
            text = self._template.format(q["question"], q["answer"])
            stating = list(self._evidence(q, caps)) if self._evidence is not None else []
            if stating:                                # a caption that states the answer (module doc)
                i = int(stating[int(rng.integers(len(stating)))])
        elif self.kind == "describe" and len(caps) > 1:
            text = caps[(i + 1 + int(rng.integers(len(caps) - 1))) % len(caps)]     # another caption
        else:
            text = caps[i]
        context = caps[i] if self.kind in ("describe", "qa_context") else ""
        if self._paraphrase > 0:                       # drawn after the document, so p=0 keeps every draw
            context = self._reword(context, rng)
            if self.kind == "describe":
                text = self._reword(text, rng)
        return context, text, q

    def _reword(self, text: str, rng) -> str:
        if not text or rng.random() >= self._paraphrase:
            return text
        return self._rewrite(text, rng) or text

    def __getitem__(self, j):
        if self.layout == "seq2seq":
            return self._seq2seq(j)
        context, text = self.text(j)
        tok = self._tok
        ctx = [int(t) for t in tok.encode(context, add_special_tokens=False)] if context else []
        body = [int(tok.bos_id)] + [int(t) for t in tok.encode(text, add_special_tokens=False)]
        room = self._t - 1 - len(body)                 # the context gives way first, then the text
        ids = (ctx[len(ctx) - room:] if room > 0 else []) + body[:self._t - 1] + [int(tok.eos_id)]
        tokens = np.full((self._t,), tok.pad_id, np.int32)
        tokens[:len(ids)] = ids
        return {"tokens": tokens}

    def _seq2seq(self, j):
        context, prompt, target = self.parts(j)
        tok = self._tok
        enc = lambda text: [int(t) for t in tok.encode(text, add_special_tokens=False)] if text else []  # noqa: E731
        ctx, head = enc(context), [int(tok.bos_id)] + enc(prompt)
        head = head[:1] + head[1:][-(self._t - 1):]          # a long prompt keeps its end (as at evaluation)
        room = self._t - len(head)                             # the context gives way first
        ids = (ctx[len(ctx) - room:] if room > 0 else []) + head
        target = enc(target)[:self._td - 1] + [int(tok.eos_id)]
        enc_tokens = np.full((self._t,), tok.pad_id, np.int32)
        enc_tokens[:len(ids)] = ids
        tokens = np.full((self._td,), tok.pad_id, np.int32)
        tokens[:len(target)] = target
        return {"enc_tokens": enc_tokens, "tokens": tokens}

    def __repr__(self) -> str:
        return f"ContextTextSource({self.kind}, docs={self._n}, T={self._t})"
