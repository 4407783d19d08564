"""Caption evaluation: COCO metrics (pycocoevalcap), COCO result files, attribute precision.

`caption_metrics` tokenizes references and predictions with pycocoevalcap's PTB tokenizer
(Stanford CoreNLP, needs `java`) and scores them with pycocoevalcap's BLEU-1..4, METEOR
(Java), ROUGE-L and CIDEr scorers -- the numbers the captioning papers report (pycocoevalcap's
`Cider` is the CIDEr-D variant: clipped n-gram counts and a Gaussian length penalty; its idf
comes from the evaluated references, so a single image scores 0). SPICE is not computed
(it downloads CoreNLP models at first use).

Java is an optional system dependency: without a `java` executable the captions are tokenized
by `simple_ptb_tokenize` (a pure-Python imitation of the PTB tokenizer's output on caption
text), METEOR is left out of the result, and one warning says so.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from typing import Hashable, Mapping, Sequence

__all__ = ["caption_metrics", "simple_ptb_tokenize", "write_coco_results", "attribute_precision",
           "attribute_words", "java_available"]

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

# What pycocoevalcap's PTBTokenizer drops after tokenizing (its PUNCTUATIONS list, lowercased
# the way its `-lowerCase` output spells them; note it does NOT drop -lrb- / -rrb-).
_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SYMBOLS = re.compile(r"([$#@%&*+=<>^~|\\])")
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m", "n't")


def java_available() -> bool:
    """True when a `java` executable is on PATH (PTB tokenizer and METEOR need it)."""
    return shutil.which("java") is not None


def _as_str(x, what: str) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if not isinstance(x, str):
        raise TypeError(f"{what} must be a string (or utf-8 bytes); got {type(x).__name__}: {x!r}.")
    return x


def simple_ptb_tokenize(text: str) -> str:
    """Pure-Python stand-in for pycocoevalcap's PTB tokenization of one caption.

    Lowercases; splits clitics ("dog's" -> "dog 's", "don't" -> "do n't"); splits symbols
    ($ % & # ...) into tokens; writes brackets as -lrb- -rrb- -lsb- ... (as CoreNLP does);
    drops quotes and the punctuation that pycocoevalcap removes (. , ; : ! ? - -- ...),
    keeping word-internal hyphens, slashes and periods ("black-and-white", "3.5", "e.g.").
    Returns the tokens joined by single spaces.
    """
    s = _as_str(text, "caption").lower().replace("\n", " ")
    for ch, name in _BRACKETS.items():
        s = s.replace(ch, f" {name} ")
    s = re.sub(r"[\"`]", " ", s)
    s = _SYMBOLS.sub(r" \1 ", s)
    s = re.sub(r"(\w)n't\b", r"\1 n't", s)
    s = re.sub(r"(\w)'(s|re|ve|ll|d|m)\b", r"\1 '\2", s)
    out = []
    for tok in s.split():
        if tok in _CLITICS or tok in _BRACKETS.values():
            out.append(tok)
            continue
        tok = tok.strip(",;:!?'").strip("-")
        if tok.endswith("."):
            # "e.g." / "u.s." keep their final period (abbreviations); "beach." / "..." lose it.
            base = tok.rstrip(".")
            tok = tok if ("." in base and tok.endswith(".") and not tok.endswith("..")) else base
            tok = tok.strip(",;:!?'").strip("-")
        if tok and tok not in _DROPPED:
            out.append(tok)
    return " ".join(out)


def _check_inputs(references, predictions) -> list:
    if not predictions:
        raise ValueError("predictions is empty: pass {image_id: caption} for at least one image.")
    ids = list(predictions)
    missing = [i for i in ids if i not in references]
    if missing:
        raise KeyError(f"predictions for image ids {missing[:5]} (of {len(missing)}) have no references; "
                       "pass references for every predicted image id.")
    for i in ids:
        refs = references[i]
        if isinstance(refs, (str, bytes)) or len(refs) == 0:
            raise ValueError(f"references[{i!r}] must be a non-empty list of strings; got {refs!r}.")
    return ids


def _tokenize_ptb(gts: dict, res: dict) -> tuple[dict, dict]:
    """One Java call for references and predictions (the tokenizer works line by line)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    joined = {("ref", i): [{"caption": c} for c in caps] for i, caps in gts.items()}
    joined.update({("pred", i): [{"caption": c} for c in caps] for i, caps in res.items()})
    out = PTBTokenizer().tokenize(joined)
    return ({i: out[("ref", i)] for i in gts}, {i: out[("pred", i)] for i in res})


def caption_metrics(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str],
                    *, meteor: bool = True) -> dict[str, float]:
    """COCO caption metrics of `predictions` against `references`, over the predicted ids.

    Args:
      references: {image_id: [reference caption, ...]} (raw text; may hold more ids).
      predictions: {image_id: generated caption} (raw text).
      meteor: compute METEOR (a Java process with a 2 GB heap: ~7 s of start-up per call on a
        2-core CPU, whatever the number of captions); False leaves it out (the evaluators'
        ``evals.<name>.meteor``; the tiny test configs turn it off).
    Returns:
      {'Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr'} -> float, in
      pycocoevalcap's 0-1 scale (CIDEr 0-10). Without Java (or if the METEOR jar fails):
      no 'METEOR' key, and one warning; with ``meteor=False`` no 'METEOR' key.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = _check_inputs(references, predictions)
    gts = {i: [_as_str(c, f"references[{i!r}]") for c in references[i]] for i in ids}
    res = {i: [_as_str(predictions[i], f"predictions[{i!r}]")] for i in ids}
    use_java = java_available()
    if use_java:
        gts, res = _tokenize_ptb(gts, res)
    else:
        warnings.warn("caption_metrics: no `java` executable on PATH, so captions are tokenized by a "
                      "pure-Python imitation of the PTB tokenizer (scores may differ slightly from the "
                      "official ones) and METEOR is not reported. Install a Java runtime (e.g. "
                      "`apt-get install default-jre-headless`) for the official numbers.",
                      RuntimeWarning, stacklevel=2)
        gts = {i: [simple_ptb_tokenize(c) for c in caps] for i, caps in gts.items()}
        res = {i: [simple_ptb_tokenize(c) for c in caps] for i, caps in res.items()}

    metrics: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    if use_java and meteor:
        metrics.update(_meteor(gts, res))
    metrics["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return metrics


def _meteor(gts: dict, res: dict) -> dict[str, float]:
    """{'METEOR': score}, or {} with a warning when the METEOR jar fails to run."""
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = None
    try:
        meteor = Meteor()
        return {"METEOR": float(meteor.compute_score(gts, res)[0])}
    except (OSError, ValueError) as e:  # JVM missing/crashing: broken pipe, empty output
        warnings.warn(f"caption_metrics: METEOR failed ({type(e).__name__}: {e}) and is not reported; "
                      "check that `java -jar meteor-1.5.jar` runs (it needs ~2 GB of heap).",
                      RuntimeWarning, stacklevel=3)
        return {}
    finally:
        if meteor is not None:  # pycocoevalcap leaves the JVM's pipes open until garbage collection
            close_meteor(meteor)


def close_meteor(meteor) -> None:
    """Stops a pycocoevalcap `Meteor` scorer's JVM and closes its pipes."""
    proc = meteor.meteor_p
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            stream.close()
        except OSError:
            pass
    proc.kill()
    proc.wait()


def write_coco_results(path: str, predictions: Mapping[Hashable, str]) -> str:
    """Writes `[{"image_id": int, "caption": str}, ...]` (COCO results format, sorted by id).

    Creates the parent directory. Returns `path`.
    """
    rows = []
    for image_id, caption in predictions.items():
        try:
            int_id = int(image_id)
        except (TypeError, ValueError):
            raise ValueError(f"write_coco_results: image id {image_id!r} is not an integer; COCO result "
                             "files need integer image ids.") from None
        rows.append({"image_id": int_id, "caption": _as_str(caption, f"predictions[{image_id!r}]")})
    rows.sort(key=lambda r: r["image_id"])
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


# ------------------------------------------------------------------ attribute precision


def attribute_words(words: Sequence[str], colors: Sequence[str], shapes: Sequence[str]
                    ) -> list[tuple[int, str, str]]:
    """The colour and shape words of a word list: [(position, 'color'|'shape', vocabulary value)].

    A word names colour c if it equals c; shape s if it equals s or its plural (s + 's',
    s + 'es'). Matching is case-insensitive.
    """
    color_of = {c.lower(): c for c in colors}
    shape_of = {}
    for s in shapes:
        for form in (s, s + "s", s + "es"):
            shape_of.setdefault(form.lower(), s)
    found = []
    for pos, w in enumerate(words):
        w = w.lower()
        if w in color_of:
            found.append((pos, "color", color_of[w]))
        elif w in shape_of:
            found.append((pos, "shape", shape_of[w]))
    return found


def _field(obj: Mapping, key: str, image_id) -> str:
    if key not in obj:
        raise KeyError(f"objects[{image_id!r}] has an entry without {key!r}: {obj!r}; objects must be dicts "
                       "with 'shape', 'color', 'bbox' (docs/interfaces.md, Data).")
    return _as_str(obj[key], f"objects[{image_id!r}][...][{key!r}]")


def attribute_precision(predictions: Mapping[Hashable, str], objects: Mapping[Hashable, Sequence[Mapping]],
                        colors: Sequence[str], shapes: Sequence[str]) -> float:
    """Fraction of colour/shape words in the generated captions that are true of the image.

    A colour word is correct if some object of that image has that colour, a shape word if
    some object has that shape (see `attribute_words` for matching, plurals included).
    Images whose object list is empty (no annotations, e.g. real photographs) are skipped.

    Args:
      predictions: {image_id: generated caption}.
      objects: {image_id: [{'color': str, 'shape': str, ...}, ...]} for every predicted id.
      colors, shapes: the attribute vocabularies (`vlm_jax.data.synthetic.COLORS`/`SHAPES`).
    Returns:
      correct / counted, or NaN when the captions hold no colour or shape word at all.
    """
    correct = counted = 0
    for image_id, caption in predictions.items():
        if image_id not in objects:
            raise KeyError(f"attribute_precision: no objects for image id {image_id!r}; pass objects for "
                           "every predicted image (an empty list skips it).")
        objs = objects[image_id]
        if len(objs) == 0:
            continue
        present = {"color": {_field(o, "color", image_id).lower() for o in objs},
                   "shape": {_field(o, "shape", image_id).lower() for o in objs}}
        words = simple_ptb_tokenize(_as_str(caption, f"predictions[{image_id!r}]")).split()
        for _, kind, value in attribute_words(words, colors, shapes):
            counted += 1
            correct += value.lower() in present[kind]
    return correct / counted if counted else float("nan")
