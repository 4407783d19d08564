"""VQAv2 accuracy, as the official evaluation script computes it (Antol et al. 2015; the
VQA-v2 `vqaEval.py`), re-implemented from its definition.

For a predicted answer ``a`` and the human answers ``h_1..h_n`` (n = 10 in VQAv2):

    acc(a) = mean over i of  min(1, #{j != i : h_j == a} / 3)

i.e. min(#humans that said it / 3, 1) averaged over the n leave-one-out subsets of n-1 humans.
A question with a single reference answer (the synthetic set) counts it as ten identical human
answers, so the prediction scores 1 or 0.

Answer normalisation (applied to the prediction and to the human answers, under the official
script's condition: only when the human answers are not all identical — with identical answers
only whitespace is normalised; ``always_normalize=True`` normalises every question):
  1. newlines / tabs -> spaces, strip.
  2. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted where it
     touches a space or the text has a digit-comma-digit group (``1,000``), else replaced by a
     space; then a period not followed by a digit is deleted (at most 32 of them, a quirk of the
     official code kept for equal scores).
  3. lower case, split on whitespace; number words zero..ten (and 'none') -> digits; the
     articles a / an / the dropped; a contraction written without its apostrophes (``dont``,
     ``youre``, ``shouldntve``) -> its spelling with them (``don't``, ``you're``, ``shouldn't've``).

Scores are fractions in [0, 1] (the official script prints them x 100), reported overall, per
question type and per answer type where the annotations give them.
"""
from __future__ import annotations

import itertools
import re
from collections import defaultdict
from typing import Iterable, Mapping

from vlm_jax.evaluation.evaluator import Evaluator

_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")     # as written in the official script: a period not before a digit
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))

# English contractions the official map restores (spelled with their apostrophes). Its "I"
# forms (I'm, I've, I'd, I'd've) are keyed with a capital I there and so never match the
# lower-cased words: they are left out here too, for the same scores.
_CONTRACTED = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've",
    "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "'ow's'at", "shan't", "she'd've", "she's",
    "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll", "somebody's",
    "someone'd", "someone'd've", "someone'll", "someone's", "something'd", "something'd've", "something'll",
    "that's", "there'd", "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're",
    "they've", "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've",
    "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've", "why'll",
    "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll", "y'all'd've",
    "you'd", "you'd've", "you'll", "you're", "you've")


def _apostrophe_variants(word: str) -> Iterable[str]:
    """Every spelling of ``word`` with some (not all kept) of its apostrophes removed."""
    parts = word.split("'")
    n = len(parts) - 1
    for keep in itertools.product((False, True), repeat=n):
        if all(keep):
            continue
        out = parts[0]
        for k, p in zip(keep, parts[1:]):
            out += ("'" if k else "") + p
        yield out


_CONTRACTIONS = {v: w for w in _CONTRACTED for v in _apostrophe_variants(w) if v != w}


def _punctuation(text: str) -> str:
    out = text
    delete = bool(_COMMA_IN_NUMBER.search(text))
    for p in _PUNCT:
        if delete or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def clean(text: str) -> str:
    """Step 1: whitespace only."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Steps 1-3 of the module docstring."""
    return _digits_articles_contractions(_punctuation(clean(text)))


def vqa_accuracy(prediction: str, answers: list[str], *, always_normalize: bool = False) -> float:
    """Accuracy of one prediction against the human answers (module docstring)."""
    if not answers:
        raise ValueError("vqa_accuracy: a question needs at least one reference answer.")
    humans = [clean(a) for a in answers]
    if len(humans) == 1:
        humans = humans * 10
    pred = clean(prediction)
    if always_normalize or len(set(humans)) > 1:
        humans = [normalize_answer(a) for a in humans]
        pred = normalize_answer(pred)
    scores = []
    for i in range(len(humans)):
        matches = sum(1 for j, h in enumerate(humans) if j != i and h == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def vqa_scores(predictions: Mapping, questions: Mapping, *, always_normalize: bool = False) -> dict[str, float]:
    """``predictions {question id: answer}``, ``questions {question id: {'answers': [...],
    optional 'question_type', 'answer_type'}}`` -> {'accuracy', 'accuracy/<question_type>',
    'accuracy_answer_type/<type>', 'num_questions', 'num_missing'}. A question without a
    prediction scores 0 and is counted in 'num_missing'."""
    total, per_q, per_a = [], defaultdict(list), defaultdict(list)
    missing = 0
    for qid, q in questions.items():
        if qid in predictions:
            acc = vqa_accuracy(str(predictions[qid]), list(q["answers"]), always_normalize=always_normalize)
        else:
            acc, missing = 0.0, missing + 1
        total.append(acc)
        if q.get("question_type"):
            per_q[str(q["question_type"])].append(acc)
        if q.get("answer_type"):
            per_a[str(q["answer_type"])].append(acc)
    out = {"accuracy": sum(total) / max(len(total), 1), "num_questions": float(len(total)),
           "num_missing": float(missing)}
    out.update({f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(per_q.items())})
    out.update({f"accuracy_answer_type/{k}": sum(v) / len(v) for k, v in sorted(per_a.items())})
    return out


# ----------------------------------------------------------------------------- the evaluator
class VQAEvaluator(Evaluator):
    """Open-ended VQA on one split: every question answered by generation, scored with the VQAv2
    accuracy above (overall, per question type, per answer type).

    The task supplies a jittable ``predict(params, model_state, batch) -> {'tokens': i32[B, L]}``
    (the answer's ids; ``batch`` holds the ``input_keys`` of `EvalSplit.question_batches`, e.g.
    'image', 'prompt', 'prompt_mask'), ``encode(question) -> {prompt arrays}`` (the task's prompt
    template and padding, e.g. 'Question: {} Short answer:'), the tokenizer that decodes the answer,
    and ``load_split() -> EvalSplit``. Writes under ``<workdir>/eval/step_<N>/<name>/``:

      results.json   the official results format [{"question_id", "answer"}]
      metrics.json   accuracy, accuracy/<question type>, accuracy_answer_type/<type>, counts
      examples.txt   the first questions with their answers and references
    """

    def __init__(self, *, name: str, every: int, predict, input_keys, encode, load_split, tokenizer,
                 batch_size: int, max_questions: int, mesh, prompt: str = ""):
        from vlm_jax.evaluation import evaluator as ev_lib
        self.name, self.every = name, int(every)
        self._predict = ev_lib.make_predict_fn(predict, mesh, input_keys, id_key="question_id")
        self._encode, self._load_split, self._tokenizer = encode, load_split, tokenizer
        self._batch_size, self._max_questions, self._prompt = int(batch_size), int(max_questions), prompt

    def run(self, params, model_state, *, step: int, workdir: str, final: bool) -> dict[str, float]:
        import json
        import os
        import time

        import jax

        from vlm_jax.evaluation import evaluator as ev_lib

        t0 = time.time()
        split = self._load_split()
        table = split.question_table()
        if self._max_questions > 0:
            table = dict(list(table.items())[: self._max_questions])
        if not table:
            raise ValueError(f"evaluator {self.name!r}: the {split.name} {split.split} split has no questions; "
                             "point it at a split / dataset with questions (e.g. data.name=vqav2, split=val).")
        rows = ev_lib.predict_over_split(self._predict, params, model_state,
                                         split.question_batches(self._batch_size, self._encode, table=table))
        tok = self._tokenizer
        answers = {qid: tok.decode([int(t) for t in _until_eos(out["tokens"], tok.eos_id)]).strip()
                   for qid, out in rows.items()}
        seconds = time.time() - t0
        if jax.process_index() != 0:
            return {}
        metrics = vqa_scores(answers, table)
        metrics["generation_seconds"] = seconds
        out_dir = os.path.join(ev_lib.eval_dir(workdir, step), self.name)
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump([{"question_id": q, "answer": a} for q, a in answers.items()], f)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({"step": step, "split": split.split, "dataset": split.name, "evaluator": self.name,
                       "prompt": self._prompt, **metrics}, f, indent=2)
        with open(os.path.join(out_dir, "examples.txt"), "w") as f:
            for qid in list(answers)[:50]:
                q = table[qid]
                f.write(f"{qid}\timage {q['image_id']}\t{q['question']!r} -> {answers[qid]!r}\t"
                        f"refs {sorted(set(q['answers']))}\n")
        lines = [f"== {self.name}: step {step}, {split.name} {split.split}, {int(metrics['num_questions'])} questions =="]
        lines += [f"  {k:<32} {v:.4f}" for k, v in metrics.items() if k.startswith("accuracy")]
        lines.append(f"  files: {out_dir}")
        print("\n".join(lines), flush=True)
        return {k: float(v) for k, v in metrics.items()}


def _until_eos(ids, eos_id: int) -> list[int]:
    out = []
    for t in ids:
        t = int(t)
        if t == eos_id:
            break
        if t > 0:
            out.append(t)
    return out
