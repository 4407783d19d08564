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
