"""Grounded caption metrics: are the generated noun phrases, counts and spatial claims true of
the objects in the image?

Dataset-agnostic: a caption is scored against its image's object annotations, a list of
``{'shape', 'color', 'size'?, 'bbox'? [ymin, xmin, ymax, xmax] in [0, 1]}`` dicts (bytes or
str values), and the attribute vocabularies are the values those annotations use
(`GroundedVocabulary.from_objects`). Images with no objects (photographs without
annotations) are skipped. Nothing here imports a dataset.

Parsing (`parse_caption`) follows the grammar of the synthetic captions
(`vlm_jax/data/synthetic.py`: listings, "there are N objects", "a single ...", "only ...",
"X to the left of / above Y", "from left to right: ...", "X at the top left"), on text with or
without punctuation (the word tokenizer drops it):

  * text is lowercased, hyphens and slashes become spaces, and it is split into words;
    '.', ';', '!' and '?' are kept as sentence boundaries, other punctuation is dropped;
  * a **noun phrase** is a maximal run of modifiers (size and colour words) followed by a head:
    a shape word, singular or plural (plurals derived from the shape names: +s, +es after
    s/x/z/ch/sh, consonant+y -> ies), or a generic noun (object(s), shape(s), thing(s)). A lone
    shape word is a phrase; a lone generic noun is not (it states no attribute). Its
    determiners ('a', 'an', 'the', a number word, 'single', 'only') directly before it belong to it;
  * a **fragment** is a run of modifiers that no head follows ("a red and a blue square":
    "red"). Fragments are unparseable phrases: they are counted (``grounded_fragments``) and
    score as phrases that name no object, never dropped;
  * number words: one..ten and positive digits.

Matching. A phrase *states* the attributes its words carry. It **matches** an object when
every stated attribute (size, colour, shape) equals the object's (a phrase stating two
different colours matches nothing); it **names** an object when it states both a colour and a
shape and matches the object (sizes included, where stated). Spatial claims *resolve* a phrase
to an object when it states a colour and a shape and exactly one object of the image has that
colour and shape (size is not needed to locate an object); claims whose phrases do not resolve
(mis-bound, ambiguous or plural phrases, objects without a bbox) are counted as unresolved and
not scored.

Positions are bbox centres. Two centres whose difference along the compared axis is at most
`tie_tolerance` (default 0.03 of the image side) do not decide an order: such pairs are counted
as ties and not scored; a centre within `tie_tolerance` of a third boundary (1/3, 2/3) is in
both thirds for position claims. (Boxes are drawn-pixel boxes, whose centres may differ from
the generator's object centres by half a pixel: 0.03 covers images of 17 px and more.)

Metrics (micro averages over all scored captions, grounded_captions = the predictions whose
image has objects; each ratio comes with its numerator and denominator as ``grounded_<thing>``
counts; a ratio with denominator 0 is NaN):

  grounded_binding_precision            = grounded_phrases_bound / grounded_phrases, where the
      denominator holds every noun phrase and every fragment of every caption, and a phrase is
      bound when it has a head and at least one object of the image matches its stated colour
      and shape (size ignored). Strict binding: "a green triangle" for an image with a green
      circle and a white triangle is unbound although both words are true somewhere.
  grounded_binding_precision_with_size  = grounded_phrases_bound_with_size / grounded_phrases:
      as above, but a phrase that states a size must also match the size.
  grounded_object_recall                = grounded_objects_named / grounded_objects: annotated
      objects named by at least one phrase of their caption.
  grounded_exact_set_rate               = grounded_exact_sets / grounded_captions: captions whose
      phrases and the image's objects pair up one-to-one under "names" (a maximum bipartite
      matching) with nothing left on either side. A phrase with a number word k fills k slots,
      a plural phrase without one fills 2, others 1; fragments and phrases naming nothing
      (wrong, incomplete or extra) break it, as do repeated phrases and unnamed objects.
  grounded_count_accuracy               = grounded_counts_correct / grounded_counts, over stated
      counts: a number word k before a phrase or generic noun (correct when exactly k objects
      match the phrase, size included: "there are three objects": the image holds 3 objects;
      "two red circles": 2 red circles; "one green triangle"), "a single X" (exactly 1 object
      matches X) and "only" before a phrase or
      generic noun ("an image containing only a purple square", "the only shape in the image
      is ...": the image holds exactly 1 object, or k after "only k").
  grounded_order_accuracy[_horizontal|_vertical] = grounded_order_correct[...] /
      grounded_order_pairs[...], over ordered pairs: each adjacent pair of phrases in a listing
      introduced by "from left to right" / "from right to left" (horizontal) or "from top to
      bottom" / "from bottom to top" (vertical), running to the next sentence boundary or
      listing marker; and each pairwise relation "X [is] (to the) left of / (to the) right of /
      on the left of / on the right of Y" (horizontal), "X [is] above / below / under Y"
      (vertical). A pair is correct when the bbox centres are in the stated order by more than
      the tie tolerance. grounded_order_accuracy pools both axes (grounded_order_correct /
      grounded_order_pairs). Unresolved pairs are counted in grounded_order_unresolved, ties
      in grounded_order_ties; neither is in the denominators.
  grounded_position_accuracy            = grounded_positions_correct / grounded_positions, over
      absolute position claims directly after a phrase: (at|in|on) the <top|middle|bottom>
      <left|center|right> [corner|side] [of the image], the image cut in thirds; an axis not
      mentioned means its middle third ("at the top" = top third, centre column; "on the left"
      = middle row, left third; "in the center" = the centre cell), as the synthetic captions
      use them. Correct when the bbox centre lies in the stated cell, each third widened by the
      tie tolerance (a centre on a boundary accepts both thirds). Unresolved claims are counted
      in grounded_positions_unresolved and not scored.
  grounded_captions_without_phrases: captions with no phrase and no fragment at all
      (unrecognisable or empty text). They contribute 0 phrases, and they are exact sets only
      if the image has no objects (never, as such images are skipped).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Hashable, Iterable, Mapping, Sequence

__all__ = ["GroundedVocabulary", "Phrase", "ParsedCaption", "CaptionScore", "parse_caption", "score_caption",
           "grounded_metrics", "plural", "tokenize", "TIE_TOLERANCE", "PREFIX"]

PREFIX = "grounded_"
TIE_TOLERANCE = 0.03

NUMBER_WORDS = {w: i + 1 for i, w in enumerate(
    ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
GENERIC_NOUNS = {"object": False, "objects": True, "shape": False, "shapes": True,
                 "thing": False, "things": True}
_ARTICLES = {"a", "an", "the"}
_BOUNDARIES = {".", ";", "!", "?"}
_TOKEN = re.compile(r"[a-z0-9_]+|[.;!?]")
_SEPARATORS = re.compile(r"[-/]")

# Pairwise relations: words between two phrases -> (axis, sign), sign +1: first phrase's centre is
# smaller along the axis (further left / higher up) than the second's.
_RELATIONS = {
    ("to", "the", "left", "of"): ("x", 1), ("left", "of"): ("x", 1), ("on", "the", "left", "of"): ("x", 1),
    ("to", "the", "right", "of"): ("x", -1), ("right", "of"): ("x", -1), ("on", "the", "right", "of"): ("x", -1),
    ("above",): ("y", 1), ("below",): ("y", -1), ("under",): ("y", -1),
}
_LISTINGS = {("from", "left", "to", "right"): ("x", 1), ("from", "right", "to", "left"): ("x", -1),
             ("from", "top", "to", "bottom"): ("y", 1), ("from", "bottom", "to", "top"): ("y", -1)}
_VERTICAL_WORDS = {"top": 0, "bottom": 2}
_HORIZONTAL_WORDS = {"left": 0, "right": 2}
_CENTRE_WORDS = {"center", "centre", "middle"}


def tokenize(text) -> list[str]:
    """Lowercase words (hyphens/slashes split words) and sentence-boundary tokens . ; ! ?"""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if not isinstance(text, str):
        raise TypeError(f"caption must be a string (or utf-8 bytes); got {type(text).__name__}: {text!r}.")
    return _TOKEN.findall(_SEPARATORS.sub(" ", text.lower()))


def plural(noun: str) -> str:
    """English plural of a (possibly multi-word) noun: circle -> circles, cross -> crosses,
    box -> boxes, patch -> patches, body -> bodies, traffic light -> traffic lights."""
    head, _, last = noun.rpartition(" ")
    if last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif len(last) > 1 and last.endswith("y") and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def _text(value, what: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string (or utf-8 bytes); got {type(value).__name__}: {value!r}.")
    return value


@dataclasses.dataclass(frozen=True)
class GroundedVocabulary:
    """Attribute words the parser recognises: the values the annotations use (lowercase)."""
    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    sizes: tuple[str, ...] = ()

    @classmethod
    def from_objects(cls, objects_per_image: Iterable[Sequence[Mapping]]) -> "GroundedVocabulary":
        """Sorted colour / shape / size values occurring in a split's object annotations."""
        found = {"color": set(), "shape": set(), "size": set()}
        for objs in objects_per_image:
            for o in objs:
                for key, values in found.items():
                    if o.get(key) is not None:
                        values.add(_text(o[key], f"object {key!r}").lower().strip())
        return cls(colors=tuple(sorted(found["color"])), shapes=tuple(sorted(found["shape"])),
                   sizes=tuple(sorted(found["size"])))

    def lexicon(self) -> dict[tuple[str, ...], tuple]:
        """{word tuple: entry}; entries ('size', v) | ('color', v) | ('shape', v, plural) |
        ('generic', plural) | ('number', k). Attribute values win over generic nouns and numbers."""
        lex: dict[tuple[str, ...], tuple] = {}
        for w, k in NUMBER_WORDS.items():
            lex[(w,)] = ("number", k)
        for w, pl in GENERIC_NOUNS.items():
            lex[(w,)] = ("generic", pl)
        for s in self.shapes:
            lex[tuple(tokenize(plural(s)))] = ("shape", s, True)
        for s in self.shapes:
            lex[tuple(tokenize(s))] = ("shape", s, False)
        for c in self.colors:
            lex[tuple(tokenize(c))] = ("color", c)
        for z in self.sizes:
            lex[tuple(tokenize(z))] = ("size", z)
        lex.pop((), None)
        return lex


@dataclasses.dataclass(frozen=True)
class Phrase:
    """A noun phrase (head 'shape' | 'generic') or a fragment (head None) of a caption.

    start/end: token span [start, end) including determiners; sizes/colors/shapes: stated
    values; number: k of a number word or 'a single' (None otherwise); only: preceded by 'only'.
    """
    text: str
    start: int
    end: int
    sizes: frozenset
    colors: frozenset
    shapes: frozenset
    head: str | None
    plural: bool = False
    number: int | None = None
    only: bool = False

    @property
    def is_phrase(self) -> bool:
        """A noun phrase with at least one stated attribute, or a fragment (scored as phrases)."""
        return self.head is None or bool(self.sizes or self.colors or self.shapes)

    @property
    def complete(self) -> bool:
        """States a colour and a shape (only complete phrases can name objects)."""
        return bool(self.colors) and bool(self.shapes) and self.head == "shape"

    @property
    def slots(self) -> int:
        return self.number if self.number is not None else (2 if self.plural else 1)


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
    tokens: tuple[str, ...]
    nominals: tuple[Phrase, ...]   # phrases, fragments and bare generic nouns, in caption order

    @property
    def phrases(self) -> list[Phrase]:
        """Noun phrases and fragments (what binding precision scores)."""
        return [p for p in self.nominals if p.is_phrase]


def parse_caption(caption, vocabulary: GroundedVocabulary) -> ParsedCaption:
    """Tokens and the noun phrases / fragments / bare generic nouns of one caption."""
    tokens = tokenize(caption)
    lex, max_len = _lexicon(vocabulary)
    # Lexical items: (kind, entry, start, end); plain words are ('word', token).
    items = []
    i = 0
    while i < len(tokens):
        for n in range(min(max_len, len(tokens) - i), 0, -1):
            entry = lex.get(tuple(tokens[i:i + n]))
            if entry is not None:
                items.append((entry, i, i + n))
                i += n
                break
        else:
            items.append((("word", tokens[i]), i, i + 1))
            i += 1

    nominals = []
    k = 0
    while k < len(items):
        kind = items[k][0][0]
        if kind not in ("size", "color", "shape", "generic"):
            k += 1
            continue
        first = k
        mods = []
        while k < len(items) and items[k][0][0] in ("size", "color"):
            mods.append(items[k][0])
            k += 1
        head, is_plural, shapes = None, False, set()
        if k < len(items) and items[k][0][0] == "shape":
            head, is_plural, shapes = "shape", items[k][0][2], {items[k][0][1]}
            k += 1
        elif k < len(items) and items[k][0][0] == "generic":
            head, is_plural = "generic", items[k][0][1]
            k += 1
        start, end = items[first][1], items[k - 1][2]
        number, only, j = _determiners(items, first)
        if j < first:
            start = items[j][1]
        nominals.append(Phrase(
            text=" ".join(tokens[start:end]), start=start, end=end,
            sizes=frozenset(v for kd, v in mods if kd == "size"),
            colors=frozenset(v for kd, v in mods if kd == "color"),
            shapes=frozenset(shapes), head=head, plural=is_plural, number=number, only=only))
    return ParsedCaption(tokens=tuple(tokens), nominals=tuple(nominals))


@functools.lru_cache(maxsize=8)
def _lexicon(vocabulary: GroundedVocabulary) -> tuple[dict, int]:
    lex = vocabulary.lexicon()
    return lex, max((len(k) for k in lex), default=1)


def _determiners(items, first: int) -> tuple[int | None, bool, int]:
    """(number, only, index of the first determiner item) for the nominal starting at items[first]."""
    number, only, j = None, False, first
    while j > 0 and first - j < 3:
        entry = items[j - 1][0]
        if entry[0] == "number" and number is None:
            number = entry[1]
        elif entry[0] == "word" and entry[1].isdigit() and int(entry[1]) > 0 and number is None:
            number = int(entry[1])
        elif (entry == ("word", "single") and number is None and j >= 2
              and items[j - 2][0] == ("word", "a")):
            number = 1   # "a single red circle"
        elif entry == ("word", "only"):
            only = True
        elif not (entry[0] == "word" and entry[1] in _ARTICLES):
            break
        j -= 1
    return number, only, j


# ------------------------------------------------------------------------------ scoring
@dataclasses.dataclass
class CaptionScore:
    """Counts of one caption (see the module docstring); `details` lists what was scored."""
    phrases: int = 0
    phrases_bound: int = 0
    phrases_bound_with_size: int = 0
    fragments: int = 0
    objects: int = 0
    objects_named: int = 0
    exact_set: bool = False
    without_phrases: bool = False
    counts: int = 0
    counts_correct: int = 0
    order_pairs_horizontal: int = 0
    order_correct_horizontal: int = 0
    order_pairs_vertical: int = 0
    order_correct_vertical: int = 0
    order_unresolved: int = 0
    order_ties: int = 0
    positions: int = 0
    positions_correct: int = 0
    positions_unresolved: int = 0
    details: list = dataclasses.field(default_factory=list)


_SUMMED = ("phrases", "phrases_bound", "phrases_bound_with_size", "fragments", "objects", "objects_named",
           "counts", "counts_correct", "order_pairs_horizontal", "order_correct_horizontal",
           "order_pairs_vertical", "order_correct_vertical", "order_unresolved", "order_ties",
           "positions", "positions_correct", "positions_unresolved")


def _attr(obj: Mapping, key: str) -> str | None:
    value = obj.get(key)
    return None if value is None else _text(value, f"object {key!r}").lower().strip()


def _matches(p: Phrase, o: Mapping, with_size: bool) -> bool:
    if any(_attr(o, "color") != c for c in p.colors) or any(_attr(o, "shape") != s for s in p.shapes):
        return False
    return not with_size or all(_attr(o, "size") == z for z in p.sizes)


def _names(p: Phrase, o: Mapping) -> bool:
    return p.complete and _matches(p, o, with_size=True)


def _centre(o: Mapping) -> tuple[float, float] | None:
    box = o.get("bbox")
    if box is None:
        return None
    y0, x0, y1, x1 = (float(v) for v in list(box)[:4])
    return (y0 + y1) / 2, (x0 + x1) / 2


def _resolve(p: Phrase, objs: Sequence[Mapping]) -> Mapping | None:
    """The one object with the phrase's colour and shape (None: unresolved)."""
    if not p.complete or p.plural or (p.number or 1) != 1:
        return None
    hits = [o for o in objs if _matches(p, o, with_size=False)]
    return hits[0] if len(hits) == 1 and _centre(hits[0]) is not None else None


def _max_matching(slots: list[Phrase], objs: Sequence[Mapping]) -> int:
    """Size of a maximum one-to-one matching slot -> object under `_names` (augmenting paths)."""
    owner: dict[int, int] = {}

    def augment(s: int, seen: set) -> bool:
        for j, o in enumerate(objs):
            if j not in seen and _names(slots[s], o):
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = s
                    return True
        return False

    return sum(augment(s, set()) for s in range(len(slots)))


def _in_third(v: float, third: int, tol: float) -> bool:
    """Does normalised coordinate v lie in third 0/1/2 (its bounds widened by `tol`)?"""
    return third / 3 - tol <= v <= (third + 1) / 3 + tol


def _position_claim(tokens: Sequence[str], i: int) -> tuple[int, int] | None:
    """(row third, column third) stated by an absolute-position phrase starting at tokens[i]."""
    if i + 2 >= len(tokens) or tokens[i] not in ("at", "in", "on") or tokens[i + 1] != "the":
        return None
    j, words = i + 2, []
    while j < len(tokens) and len(words) < 2 and (
            tokens[j] in _VERTICAL_WORDS or tokens[j] in _HORIZONTAL_WORDS or tokens[j] in _CENTRE_WORDS):
        words.append(tokens[j])
        j += 1
    if not words:
        return None
    vert = [w for w in words if w in _VERTICAL_WORDS]
    horiz = [w for w in words if w in _HORIZONTAL_WORDS]
    if len(vert) > 1 or len(horiz) > 1:
        return None
    if j < len(tokens) and tokens[j] in ("corner", "side"):
        j += 1
    if j < len(tokens) and tokens[j] == "of":   # "of the image" only; "on the left of X" is a relation
        if tuple(tokens[j + 1:j + 3]) not in (("the", "image"), ("the", "picture")):
            return None
    return (_VERTICAL_WORDS[vert[0]] if vert else 1, _HORIZONTAL_WORDS[horiz[0]] if horiz else 1)


def _score_pair(score: CaptionScore, a: Phrase, b: Phrase, axis: str, sign: int, objs, tol: float,
                source: str) -> None:
    oa, ob = _resolve(a, objs), _resolve(b, objs)
    if oa is None or ob is None or oa is ob:
        score.order_unresolved += 1
        score.details.append(("order", source, a.text, b.text, "unresolved"))
        return
    k = 0 if axis == "y" else 1
    delta = sign * (_centre(ob)[k] - _centre(oa)[k])
    if abs(delta) <= tol:
        score.order_ties += 1
        score.details.append(("order", source, a.text, b.text, "tie"))
        return
    ok = delta > 0
    if axis == "x":
        score.order_pairs_horizontal += 1
        score.order_correct_horizontal += ok
    else:
        score.order_pairs_vertical += 1
        score.order_correct_vertical += ok
    score.details.append(("order", source, a.text, b.text, ok))


def score_caption(caption, objects: Sequence[Mapping], vocabulary: GroundedVocabulary, *,
                  tie_tolerance: float = TIE_TOLERANCE) -> CaptionScore:
    """The grounded counts of one caption against its image's objects (module docstring)."""
    objs = list(objects)
    parsed = parse_caption(caption, vocabulary)
    tokens = parsed.tokens
    phrases = parsed.phrases
    score = CaptionScore(objects=len(objs), without_phrases=not phrases)

    # Binding.
    for p in phrases:
        score.phrases += 1
        score.fragments += p.head is None
        bound = p.head is not None and any(_matches(p, o, with_size=False) for o in objs)
        bound_size = p.head is not None and any(_matches(p, o, with_size=True) for o in objs)
        score.phrases_bound += bound
        score.phrases_bound_with_size += bound_size
        score.details.append(("phrase", p.text, bound, bound_size))

    # Recall and exact set.
    score.objects_named = sum(any(_names(p, o) for p in phrases) for o in objs)
    slots = [p for p in phrases for _ in range(p.slots)]
    score.exact_set = len(slots) == len(objs) and _max_matching(slots, objs) == len(objs)

    # Counts.
    for p in parsed.nominals:
        if p.number is not None and p.head is not None:
            got = sum(_matches(p, o, with_size=True) for o in objs)
            score.counts += 1
            score.counts_correct += got == p.number
            score.details.append(("count", p.text, p.number, got))
        if p.only and p.head is not None and (p.number is not None or not p.plural):
            want = p.number if p.number is not None else 1
            score.counts += 1
            score.counts_correct += len(objs) == want
            score.details.append(("count", "only " + p.text, want, len(objs)))

    # Pairwise relations between consecutive phrases in one sentence.
    for a, b in zip(phrases, phrases[1:]):
        between = [t for t in tokens[a.end:b.start] if t not in ("is", "are")]
        rel = _RELATIONS.get(tuple(between))
        if rel is not None:
            _score_pair(score, a, b, rel[0], rel[1], objs, tie_tolerance, "relation")

    # Listings: adjacent phrases after a marker, up to a sentence boundary or the next marker.
    marks = [(i, _LISTINGS[tuple(tokens[i:i + 4])]) for i in range(len(tokens))
             if tuple(tokens[i:i + 4]) in _LISTINGS]
    stops = sorted([i for i, t in enumerate(tokens) if t in _BOUNDARIES] + [i for i, _ in marks] + [len(tokens)])
    for i, (axis, sign) in marks:
        stop = next(s for s in stops if s > i)
        listed = [p for p in phrases if p.start >= i + 4 and p.end <= stop]
        for a, b in zip(listed, listed[1:]):
            _score_pair(score, a, b, axis, sign, objs, tie_tolerance, "listing")

    # Absolute positions right after a phrase.
    for p in phrases:
        claim = _position_claim(tokens, p.end)
        if claim is None:
            continue
        o = _resolve(p, objs)
        if o is None:
            score.positions_unresolved += 1
            score.details.append(("position", p.text, claim, "unresolved"))
            continue
        cy, cx = _centre(o)
        ok = _in_third(cy, claim[0], tie_tolerance) and _in_third(cx, claim[1], tie_tolerance)
        score.positions += 1
        score.positions_correct += ok
        score.details.append(("position", p.text, claim, ok))
    return score


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def grounded_metrics(predictions: Mapping[Hashable, str], objects: Mapping[Hashable, Sequence[Mapping]],
                     vocabulary: GroundedVocabulary | None = None, *,
                     tie_tolerance: float = TIE_TOLERANCE) -> dict[str, float | int]:
    """Grounded caption metrics of `predictions` (see the module docstring for definitions).

    Args:
      predictions: {image_id: caption}.
      objects: {image_id: [{'shape', 'color', 'size'?, 'bbox'?}, ...]} for every predicted id;
        images with an empty list are skipped.
      vocabulary: attribute words; default: the values `objects` uses.
      tie_tolerance: centre differences (normalised) at most this much decide nothing.
    Returns:
      {'grounded_<metric>': float (NaN without a denominator), 'grounded_<count>': int}.
    """
    missing = [i for i in predictions if i not in objects]
    if missing:
        raise KeyError(f"grounded_metrics: no objects for image ids {missing[:5]}; pass objects for every "
                       "predicted image (an empty list skips it).")
    if vocabulary is None:
        vocabulary = GroundedVocabulary.from_objects(objects.values())
    total = CaptionScore()
    captions = exact = without = 0
    for image_id, caption in predictions.items():
        objs = objects[image_id]
        if len(objs) == 0:
            continue
        s = score_caption(caption, objs, vocabulary, tie_tolerance=tie_tolerance)
        captions += 1
        exact += s.exact_set
        without += s.without_phrases
        for name in _SUMMED:
            setattr(total, name, getattr(total, name) + getattr(s, name))
    t = total
    pairs = t.order_pairs_horizontal + t.order_pairs_vertical
    correct = t.order_correct_horizontal + t.order_correct_vertical
    out = {
        "binding_precision": _ratio(t.phrases_bound, t.phrases),
        "binding_precision_with_size": _ratio(t.phrases_bound_with_size, t.phrases),
        "object_recall": _ratio(t.objects_named, t.objects),
        "exact_set_rate": _ratio(exact, captions),
        "count_accuracy": _ratio(t.counts_correct, t.counts),
        "order_accuracy": _ratio(correct, pairs),
        "order_accuracy_horizontal": _ratio(t.order_correct_horizontal, t.order_pairs_horizontal),
        "order_accuracy_vertical": _ratio(t.order_correct_vertical, t.order_pairs_vertical),
        "position_accuracy": _ratio(t.positions_correct, t.positions),
        "captions": captions, "captions_without_phrases": without, "exact_sets": exact,
        "phrases": t.phrases, "phrases_bound": t.phrases_bound,
        "phrases_bound_with_size": t.phrases_bound_with_size, "fragments": t.fragments,
        "objects": t.objects, "objects_named": t.objects_named,
        "counts": t.counts, "counts_correct": t.counts_correct,
        "order_pairs": pairs, "order_correct": correct,
        "order_pairs_horizontal": t.order_pairs_horizontal, "order_correct_horizontal": t.order_correct_horizontal,
        "order_pairs_vertical": t.order_pairs_vertical, "order_correct_vertical": t.order_correct_vertical,
        "order_unresolved": t.order_unresolved, "order_ties": t.order_ties,
        "positions": t.positions, "positions_correct": t.positions_correct,
        "positions_unresolved": t.positions_unresolved,
    }
    return {PREFIX + k: v for k, v in out.items()}
