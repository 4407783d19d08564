"""Tests of vlm_jax.evaluation.grounded: grounded caption metrics on hand-made captions with known
answers, and a perfect score on the synthetic set's own reference captions."""
import json
import math
import types

import numpy as np
import pytest

from vlm_jax.evaluation import captioning, grounded

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
VOCAB = grounded.GroundedVocabulary(colors=COLORS, shapes=SHAPES, sizes=("large", "small"))


def obj(color, shape, centre=(0.5, 0.5), size="small", half=0.08):
    y, x = centre
    return {"color": color, "shape": shape, "size": size,
            "bbox": np.asarray([y - half, x - half, y + half, x + half], np.float32)}


def score(caption, objs):
    return grounded.score_caption(caption, objs, VOCAB)


def metrics(captions, objs):
    """grounded_metrics over several captions of the same image."""
    return grounded.grounded_metrics(dict(enumerate(captions)), {i: objs for i in range(len(captions))}, VOCAB)


# ------------------------------------------------------------------------ parsing
def test_plural_and_tokenize():
    assert [grounded.plural(w) for w in ("circle", "cross", "box", "patch", "body", "day", "traffic light")] == \
        ["circles", "crosses", "boxes", "patches", "bodies", "days", "traffic lights"]
    assert grounded.tokenize("From left-to-right: a Red circle, and a blue/green square.") == \
        ["from", "left", "to", "right", "a", "red", "circle", "and", "a", "blue", "green", "square", "."]
    assert grounded.tokenize(b"a red circle") == ["a", "red", "circle"]


def test_parse_caption_phrases_determiners_and_fragments():
    parsed = grounded.parse_caption("there are two objects: a small red circle and two white crosses, "
                                    "a single large square; only a red and a", VOCAB)
    got = [(p.text, p.head, sorted(p.sizes), sorted(p.colors), sorted(p.shapes), p.plural, p.number, p.only)
           for p in parsed.nominals]
    assert got == [
        ("two objects", "generic", [], [], [], True, 2, False),              # bare generic noun: a count only
        ("a small red circle", "shape", ["small"], ["red"], ["circle"], False, None, False),
        ("two white crosses", "shape", [], ["white"], ["cross"], True, 2, False),
        ("a single large square", "shape", ["large"], [], ["square"], False, 1, False),
        ("only a red", None, [], ["red"], [], False, None, True),            # fragment: no head
    ]
    assert [p.text for p in parsed.phrases] == ["a small red circle", "two white crosses",
                                                "a single large square", "only a red"]
    assert grounded.parse_caption("", VOCAB).nominals == ()


# ------------------------------------------------------------------------ binding
def test_mis_bound_phrase_scores_zero_though_both_words_are_true():
    objs = [obj("green", "circle", (0.5, 0.2)), obj("white", "triangle", (0.5, 0.8))]
    s = score("a green triangle", objs)
    assert (s.phrases, s.phrases_bound, s.phrases_bound_with_size) == (1, 0, 0)
    assert (s.objects, s.objects_named, s.exact_set) == (2, 0, False)
    # word-level attribute precision calls the same caption perfect
    assert captioning.attribute_precision({0: "a green triangle"}, {0: objs}, COLORS, SHAPES) == 1.0

    m = metrics(["a green triangle", "a green circle and a white triangle", "a white circle and a green triangle"],
                objs)
    assert (m["grounded_phrases"], m["grounded_phrases_bound"]) == (5, 2)
    assert m["grounded_binding_precision"] == pytest.approx(2 / 5)
    assert (m["grounded_objects"], m["grounded_objects_named"]) == (6, 2)
    assert m["grounded_object_recall"] == pytest.approx(2 / 6)
    assert (m["grounded_captions"], m["grounded_exact_sets"]) == (3, 1)
    assert m["grounded_exact_set_rate"] == pytest.approx(1 / 3)


def test_size_mismatch_only_fails_binding_with_size():
    objs = [obj("red", "circle", size="small"), obj("blue", "square", size="large")]
    s = score("a large red circle and a large blue square", objs)
    assert (s.phrases, s.phrases_bound, s.phrases_bound_with_size) == (2, 2, 1)
    assert (s.objects_named, s.exact_set) == (1, False)   # "a large red circle" names no object
    s = score("a small red circle and a large blue square", objs)
    assert (s.phrases_bound, s.phrases_bound_with_size, s.objects_named, s.exact_set) == (2, 2, 2, True)
    s = score("a red circle and a blue square", objs)     # no size stated: nothing to get wrong
    assert (s.phrases_bound_with_size, s.exact_set) == (2, True)
    m = metrics(["a large red circle and a large blue square", "a small red circle and a large blue square"], objs)
    assert m["grounded_binding_precision"] == 1.0
    assert m["grounded_binding_precision_with_size"] == pytest.approx(3 / 4)
    assert m["grounded_object_recall"] == pytest.approx(3 / 4)
    assert m["grounded_exact_set_rate"] == pytest.approx(1 / 2)


def test_duplicates_break_the_exact_set_but_not_binding():
    objs = [obj("red", "circle", (0.5, 0.2)), obj("blue", "square", (0.5, 0.8))]
    s = score("a red circle and a red circle", objs)
    assert (s.phrases, s.phrases_bound, s.objects_named, s.exact_set) == (2, 2, 1, False)
    s = score("a red circle, a blue square and a red circle", objs)
    assert (s.phrases, s.phrases_bound, s.objects_named, s.exact_set) == (3, 3, 2, False)
    s = score("a red circle and a blue square", objs)
    assert (s.phrases, s.phrases_bound, s.objects_named, s.exact_set) == (2, 2, 2, True)
    # an incomplete phrase is bound (a circle exists) but names nothing, so the set is not exact
    s = score("a circle and a blue square", objs)
    assert (s.phrases_bound, s.objects_named, s.exact_set) == (2, 1, False)


def test_plural_phrases_fill_their_count_of_slots():
    objs = [obj("white", "cross", (0.2, 0.2)), obj("white", "cross", (0.8, 0.8))]
    s = score("two white crosses", objs)
    assert (s.phrases, s.phrases_bound, s.objects_named, s.exact_set) == (1, 1, 2, True)
    assert (s.counts, s.counts_correct) == (1, 1)
    assert score("three white crosses", objs).exact_set is False
    assert score("white crosses", objs).exact_set is True      # plural without a number: 2 slots
    assert score("a white cross", objs).exact_set is False


# ------------------------------------------------------------------------ unparseable
def test_unparseable_empty_and_fragment_text():
    objs = [obj("red", "circle")]
    m = metrics(["", "<unk> <unk> <unk>", "the quick brown fox jumps", "objects objects"], objs)
    assert m["grounded_captions"] == 4 and m["grounded_captions_without_phrases"] == 4
    assert m["grounded_phrases"] == 0 and math.isnan(m["grounded_binding_precision"])
    assert math.isnan(m["grounded_binding_precision_with_size"])
    assert m["grounded_object_recall"] == 0.0 and m["grounded_exact_set_rate"] == 0.0
    assert m["grounded_counts"] == 0 and math.isnan(m["grounded_count_accuracy"])
    assert m["grounded_order_pairs"] == 0 and math.isnan(m["grounded_order_accuracy"])
    assert m["grounded_positions"] == 0 and math.isnan(m["grounded_position_accuracy"])

    # fragments are unparseable phrases: counted as phrases that name nothing, not dropped
    objs = [obj("red", "circle", (0.5, 0.2)), obj("blue", "square", (0.5, 0.8))]
    s = score("a red and a blue square", objs)
    assert (s.phrases, s.fragments, s.phrases_bound, s.objects_named, s.exact_set, s.without_phrases) == \
        (2, 1, 1, 1, False, False)
    s = score("a large", objs)
    assert (s.phrases, s.fragments, s.phrases_bound, s.without_phrases) == (1, 1, 0, False)
    s = score("a red blue circle", objs)                  # two colours: matches no object
    assert (s.phrases, s.phrases_bound) == (1, 0)


# ------------------------------------------------------------------------ counts
def test_count_statements():
    objs = [obj("red", "circle", (0.2, 0.2)), obj("red", "square", (0.5, 0.5)), obj("blue", "square", (0.8, 0.8))]
    cases = {   # caption -> (stated counts, correct ones)
        "there are three objects: a red circle, a red square and a blue square": (1, 1),
        "there are 3 objects": (1, 1),
        "there are two objects: a red circle and a blue square": (1, 0),
        "there is one object": (1, 0),
        "two red circles": (1, 0),
        "two squares": (1, 1),
        "one red circle and one blue square": (2, 2),
        "a single blue square": (1, 1),
        "a single square": (1, 0),
        "an image containing only a red circle": (1, 0),
        "the only shape in the image is a red circle": (1, 0),
        "a red circle and a blue square": (0, 0),          # no count stated
    }
    for caption, want in cases.items():
        s = score(caption, objs)
        assert (s.counts, s.counts_correct) == want, caption
    m = metrics(list(cases), objs)
    assert (m["grounded_counts"], m["grounded_counts_correct"]) == (12, 6)
    assert m["grounded_count_accuracy"] == pytest.approx(6 / 12)

    single = [obj("white", "cross", (0.2, 0.5), size="large")]
    for caption in ("there is one object: a large white cross", "a single large white cross on a gray background",
                    "an image containing only a white cross",
                    "the only shape in the image is a large white cross at the top of the image"):
        s = score(caption, single)
        assert (s.counts, s.counts_correct, s.exact_set) == (1, 1, True), caption
    s = score("a single small white cross", single)         # size is part of what is counted
    assert (s.counts, s.counts_correct) == (1, 0)


# ------------------------------------------------------------------------ spatial order
ORDER_OBJS = [obj("red", "circle", (0.8, 0.2)), obj("blue", "square", (0.5, 0.5)),
              obj("green", "triangle", (0.2, 0.8))]


def test_listings_and_relations():
    cases = {   # caption -> (horizontal pairs, correct, vertical pairs, correct)
        "from left to right: a red circle, a green triangle and a blue square": (2, 1, 0, 0),
        "from top to bottom a green triangle a blue square and a red circle": (0, 0, 2, 2),
        "a red circle to the left of a blue square": (1, 1, 0, 0),
        "a red circle above a blue square": (0, 0, 1, 0),
        "a blue square is to the right of a red circle, plus a green triangle": (1, 1, 0, 0),
        "from right to left: a green triangle and a red circle": (1, 1, 0, 0),
        "from bottom to top: a green triangle and a red circle": (0, 0, 1, 0),
        "a green triangle below a red circle": (0, 0, 1, 0),
        "a red circle and a blue square": (0, 0, 0, 0),
    }
    for caption, want in cases.items():
        s = score(caption, ORDER_OBJS)
        got = (s.order_pairs_horizontal, s.order_correct_horizontal, s.order_pairs_vertical, s.order_correct_vertical)
        assert got == want, caption
        assert s.order_unresolved == s.order_ties == 0
    m = metrics(list(cases), ORDER_OBJS)
    assert (m["grounded_order_pairs_horizontal"], m["grounded_order_correct_horizontal"]) == (5, 4)
    assert (m["grounded_order_pairs_vertical"], m["grounded_order_correct_vertical"]) == (5, 2)
    assert m["grounded_order_accuracy_horizontal"] == pytest.approx(4 / 5)
    assert m["grounded_order_accuracy_vertical"] == pytest.approx(2 / 5)
    assert (m["grounded_order_pairs"], m["grounded_order_correct"]) == (10, 6)
    assert m["grounded_order_accuracy"] == pytest.approx(6 / 10)


def test_unresolved_and_tied_pairs_are_counted_not_scored():
    objs = ORDER_OBJS + [obj("purple", "diamond", (0.9, 0.51))]
    s = score("a purple circle to the left of a blue square", objs)      # mis-bound phrase
    assert (s.order_unresolved, s.order_pairs_horizontal) == (1, 0)
    s = score("a circle to the left of a blue square", objs)             # incomplete phrase
    assert (s.order_unresolved, s.order_pairs_horizontal) == (1, 0)
    s = score("from left to right: a red circle, a red circle and a blue square", objs)  # same object twice
    assert (s.order_unresolved, s.order_pairs_horizontal, s.order_correct_horizontal) == (1, 1, 1)
    s = score("a purple diamond to the left of a blue square", objs)     # centres 0.01 apart in x
    assert (s.order_ties, s.order_pairs_horizontal) == (1, 0)
    s = score("a blue square above a purple diamond", objs)              # clear in y
    assert (s.order_ties, s.order_pairs_vertical, s.order_correct_vertical) == (0, 1, 1)
    # a listing ends at a sentence boundary
    s = score("from left to right: a red circle and a blue square. a green triangle", objs)
    assert (s.order_pairs_horizontal, s.order_correct_horizontal) == (1, 1)
    no_box = [{k: v for k, v in o.items() if k != "bbox"} for o in ORDER_OBJS]
    s = score("a red circle to the left of a blue square", no_box)
    assert (s.order_unresolved, s.order_pairs_horizontal) == (1, 0)


def test_absolute_positions():
    objs = [obj("red", "circle", (0.15, 0.15)), obj("blue", "square", (0.5, 0.85)),
            obj("green", "triangle", (0.5, 0.5)), obj("yellow", "diamond", (0.34, 0.5))]
    cases = {   # caption -> (claims, correct)
        "a red circle at the top left, a blue square on the right and a green triangle in the center": (3, 3),
        "a red circle in the top left corner of the image": (1, 1),
        "a blue square on the right side of the image": (1, 1),
        "a blue square at the top": (1, 0),
        "a green triangle on the left side of the image": (1, 0),
        "a red circle on the left of a blue square": (0, 0),       # a relation, not a position
        "a yellow diamond at the top": (1, 1),                     # centre 0.34: on the boundary, both thirds
        "a yellow diamond in the center": (1, 1),
        "a yellow diamond at the bottom": (1, 0),
    }
    for caption, want in cases.items():
        s = score(caption, objs)
        assert (s.positions, s.positions_correct) == want, caption
    s = score("a purple circle at the top left", objs)
    assert (s.positions, s.positions_unresolved) == (0, 1)
    m = metrics(list(cases), objs)
    assert (m["grounded_positions"], m["grounded_positions_correct"]) == (10, 7)
    assert m["grounded_position_accuracy"] == pytest.approx(7 / 10)


# ------------------------------------------------------------------------ aggregation
def test_grounded_metrics_over_a_split():
    objects = {
        1: [obj(b"green", b"circle", (0.5, 0.2)), obj(b"white", b"triangle", (0.5, 0.8), size=b"large")],
        2: [obj("red", "square", (0.5, 0.5))],
        3: [],                                   # no annotations: skipped
    }
    preds = {1: "from left to right: a green circle and a large white triangle", 2: b"a white square",
             3: "a red circle"}
    vocab = grounded.GroundedVocabulary.from_objects(objects.values())
    assert vocab == grounded.GroundedVocabulary(colors=("green", "red", "white"),
                                                shapes=("circle", "square", "triangle"), sizes=("large", "small"))
    m = grounded.grounded_metrics(preds, objects)                 # vocabulary from the objects by default
    assert all(k.startswith("grounded_") for k in m)
    assert m["grounded_captions"] == 2
    assert (m["grounded_phrases"], m["grounded_phrases_bound"]) == (3, 2)
    assert m["grounded_binding_precision"] == pytest.approx(2 / 3)
    assert (m["grounded_objects"], m["grounded_objects_named"]) == (3, 2)
    assert m["grounded_exact_set_rate"] == pytest.approx(1 / 2)
    assert (m["grounded_order_pairs_horizontal"], m["grounded_order_correct_horizontal"]) == (1, 1)
    assert math.isnan(m["grounded_order_accuracy_vertical"]) and m["grounded_order_accuracy"] == 1.0
    # words outside the annotations' values are plain words: "blue" is no colour of this split
    assert grounded.grounded_metrics({2: "a blue square"}, objects)["grounded_binding_precision"] == 1.0
    with pytest.raises(KeyError, match="no objects for image ids"):
        grounded.grounded_metrics({9: "a red circle"}, objects)


# ------------------------------------------------------------------------ reference captions
@pytest.mark.parametrize("image_size", [56, 32])
def test_reference_captions_score_perfectly(image_size):
    from vlm_jax.data import synthetic
    from vlm_jax.data.tokenizer import normalize

    preds, objects = {}, {}
    for i in range(150):
        rng = np.random.default_rng([11, image_size, i])
        _, objs, captions, _ = synthetic.sample_scene(image_size, rng)
        ann = [dict(shape=o.shape, color=o.color, size=o.size, bbox=np.asarray(o.bbox, np.float32)) for o in objs]
        for c in captions:   # as written, and as the word tokenizer's decode gives it back (no punctuation)
            for text in (c, " ".join(normalize(c))):
                preds[len(preds)] = text
                objects[len(objects)] = ann
    m = grounded.grounded_metrics(preds, objects)
    ratios = {k: v for k, v in m.items() if isinstance(v, float)}
    assert set(ratios) == {"grounded_binding_precision", "grounded_binding_precision_with_size",
                           "grounded_object_recall", "grounded_exact_set_rate", "grounded_count_accuracy",
                           "grounded_order_accuracy", "grounded_order_accuracy_horizontal",
                           "grounded_order_accuracy_vertical", "grounded_position_accuracy"}
    assert ratios == {k: 1.0 for k in ratios}
    # not vacuous: every kind of claim occurs, and nothing was left unparsed or unresolved
    for key in ("grounded_phrases", "grounded_counts", "grounded_order_pairs_horizontal",
                "grounded_order_pairs_vertical", "grounded_positions"):
        assert m[key] > 200, key
    assert m["grounded_captions"] == len(preds) and m["grounded_objects"] == m["grounded_phrases"]
    assert m["grounded_fragments"] == m["grounded_captions_without_phrases"] == 0
    assert m["grounded_order_unresolved"] == m["grounded_positions_unresolved"] == 0


# ------------------------------------------------------------------------ evaluator hook
def test_caption_evaluator_writes_grounded_metrics(tmp_path, monkeypatch):
    from vlm_jax.data.tokenizer import WordTokenizer
    from vlm_jax.evaluation import caption_eval, evaluator

    objs = {1: [obj("green", "circle", (0.5, 0.2)), obj("white", "triangle", (0.5, 0.8))], 2: [obj("red", "cross")]}
    texts = {1: "a green triangle to the left of a white triangle", 2: "there is one object: a red cross"}
    tok = WordTokenizer.build(texts.values())
    rows = {i: {"tokens": np.asarray(tok.encode(t)[1:], np.int32)} for i, t in texts.items()}
    monkeypatch.setattr(evaluator, "make_predict_fn", lambda *a, **k: None)
    monkeypatch.setattr(evaluator, "predict_over_split", lambda *a, **k: rows)
    monkeypatch.setattr(captioning, "caption_metrics", lambda refs, preds, meteor=True: {"CIDEr": 0.0})   # no Java here
    split = types.SimpleNamespace(split="test", references={1: ["x"], 2: ["y"]}, objects=objs,
                                  batches=lambda batch_size: [])
    ev = caption_eval.CaptionEvaluator(name="caption", every=0, predict=None, input_keys=("image",),
                                       load_split=lambda: split, tokenizer=tok, batch_size=2, max_examples=0,
                                       num_figures=0, grid=4, mesh=None)
    out = ev.run(None, None, step=3, workdir=str(tmp_path), final=True)
    saved = json.loads((tmp_path / "eval" / "step_3" / "metrics.json").read_text())
    assert saved["attribute_precision"] == 1.0            # the word-level metric stays
    assert saved["grounded_phrases"] == 3 and saved["grounded_phrases_bound"] == 2
    assert saved["grounded_binding_precision"] == pytest.approx(2 / 3)
    assert saved["grounded_order_unresolved"] == 1 and saved["grounded_count_accuracy"] == 1.0
    assert out["grounded_binding_precision"] == pytest.approx(2 / 3)
