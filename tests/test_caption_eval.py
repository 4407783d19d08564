"""Tests of vlm_jax.evaluation: caption metrics, attribute precision, attention localization, plots."""
import json
import shutil
import warnings

import numpy as np
import pytest

from vlm_jax.evaluation import captioning, localization, plots

COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")

REFERENCES = {
    11: ["A red circle to the left of a blue square.", "there are two objects: a red circle and a blue square",
         "a small red circle and a large blue square", "A red circle, next to a blue square!",
         "from left to right: a red circle and a blue square"],
    12: ["A green triangle at the top of the image.", "one green triangle", "a picture showing a green triangle",
         "the only shape in the image is a small green triangle"],
    13: ["a white cross above a yellow diamond", "there are two objects: a yellow diamond and a white cross",
         "a white cross and a yellow diamond (below it)", "from top to bottom: a white cross and a yellow diamond"],
    14: ["A purple square in the bottom left corner.", "a single large purple square on a gray background",
         "an image containing only a purple square"],
}
PREDICTIONS = {
    11: "a red circle to the left of a blue square",
    12: "a green triangle at the top of the image",
    13: "there are two objects: a white diamond and a yellow cross",
    14: "a purple circle on a gray background.",
}

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a java executable")


def oracle_scores(references, predictions):
    """pycocoevalcap's own pipeline (as COCOEvalCap.evaluate, without SPICE)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tok.tokenize({i: [{"caption": predictions[i]}] for i in references})
    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"Bleu_{n + 1}": b for n, b in enumerate(bleu)})
    meteor = Meteor()
    out["METEOR"] = meteor.compute_score(gts, res)[0]
    captioning.close_meteor(meteor)
    out["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = Cider().compute_score(gts, res)[0]
    return out


@pytest.fixture(scope="module")
def oracle():
    if shutil.which("java") is None:
        pytest.skip("needs a java executable")
    return oracle_scores(REFERENCES, PREDICTIONS)


@needs_java
def test_caption_metrics_equal_pycocoevalcap(oracle):
    refs = {**REFERENCES, 99: ["an unused reference image"]}  # extra ids are ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = captioning.caption_metrics(refs, PREDICTIONS)
    assert set(got) == set(captioning.METRIC_NAMES)
    for name in captioning.METRIC_NAMES:
        assert got[name] == pytest.approx(oracle[name], rel=1e-9, abs=1e-12), name
    # the toy set is neither trivial nor perfect
    assert 0.2 < got["Bleu_4"] < 0.95 and 0.1 < got["METEOR"] < 0.9 and 0.5 < got["CIDEr"] < 9


@needs_java
def test_without_java_falls_back_and_omits_meteor(monkeypatch, oracle):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = captioning.caption_metrics(REFERENCES, PREDICTIONS)
    relevant = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(relevant) == 1 and "java" in str(relevant[0].message) and "METEOR" in str(relevant[0].message)
    assert "METEOR" not in got
    # the fallback tokenizer reproduces PTB tokens on caption text, so the other metrics agree
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert got[name] == pytest.approx(oracle[name], rel=1e-9), name


@needs_java
def test_simple_tokenizer_matches_ptb():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    sentences = ["A man's dog, running (fast) on the beach.", "Don't stop: it's 3.5 \"feet\" tall!",
                 "A black-and-white cat; sitting on a TV-stand...", "Two people -- one is tall -- and/or a kid's toy?",
                 "there are 2 objects: a red circle & a green square", "", "they're here, we've gone, I'll go",
                 "costs $5 at #1 store, 50% off", "it's the dogs' ball `quoted' ok", "e.g. the u.s. flag",
                 "x [y] {z}", "from left to right: a small red circle and a large blue cross"]
    ptb = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    for i, s in enumerate(sentences):
        assert captioning.simple_ptb_tokenize(s) == ptb[i][0], s


def test_caption_metrics_input_errors():
    with pytest.raises(KeyError, match="no references"):
        captioning.caption_metrics({1: ["a b"]}, {2: "a b"})
    with pytest.raises(ValueError, match="non-empty list"):
        captioning.caption_metrics({1: []}, {1: "a b"})
    with pytest.raises(ValueError, match="empty"):
        captioning.caption_metrics({1: ["a"]}, {})


def test_write_coco_results(tmp_path):
    path = tmp_path / "sub" / "results.json"
    captioning.write_coco_results(str(path), {np.int64(7): "a red circle", 3: b"a blue square"})
    rows = json.loads(path.read_text())
    assert rows == [{"image_id": 3, "caption": "a blue square"}, {"image_id": 7, "caption": "a red circle"}]
    assert all(type(r["image_id"]) is int for r in rows)
    with pytest.raises(ValueError, match="integer"):
        captioning.write_coco_results(str(path), {"img_a": "x"})


def _obj(color, shape, bbox=(0.0, 0.0, 1.0, 1.0)):
    return {"color": color, "shape": shape, "size": "small", "bbox": np.asarray(bbox, np.float32)}


def test_attribute_precision_hand_examples():
    objects = {
        1: [_obj("red", "circle"), _obj("blue", "square")],
        2: [_obj(b"white", b"cross")],          # TFDS Text features decode to bytes
        3: [],                                  # no annotations: skipped
        4: [_obj("green", "diamond")],
    }
    preds = {
        1: "a red circle and a green square.",  # red ok, circle ok, green wrong, square ok
        2: "Two white crosses",                 # white ok, crosses (plural) ok
        3: "a red circle",                      # skipped
        4: "a large object in the middle",      # no attribute words
    }
    assert captioning.attribute_precision(preds, objects, COLORS, SHAPES) == pytest.approx(5 / 6)
    assert captioning.attribute_precision({1: "a blue triangle"}, objects, COLORS, SHAPES) == pytest.approx(0.5)
    assert np.isnan(captioning.attribute_precision({4: "nothing here"}, objects, COLORS, SHAPES))
    with pytest.raises(KeyError, match="no objects for image id 9"):
        captioning.attribute_precision({9: "a red circle"}, objects, COLORS, SHAPES)


def _one_hot(grid, cells, n_rows):
    a = np.full((n_rows, grid * grid), 0.01, np.float32)
    for row, (r, c) in enumerate(cells):
        if r is not None:
            a[row, r * grid + c] = 1.0
    return a / a.sum(-1, keepdims=True)


def test_attention_localization_hand_examples():
    g = 4  # cell (r, c) has centre ((r + .5) / 4, (c + .5) / 4)
    objects = {
        1: [_obj("red", "circle", (0.0, 0.0, 0.5, 0.5)), _obj("blue", "square", (0.5, 0.5, 1.0, 1.0))],
        2: [_obj("green", "triangle", (0.0, 0.0, 0.5, 1.0))],
        3: [_obj("red", "circle", (0.0, 0.0, 0.5, 0.5)), _obj("red", "square", (0.25, 0.25, 0.75, 0.75))],
        4: [],
    }
    words = {
        1: ["a", "red", "circle", "and", "a", "blue", "square"],
        2: "a yellow triangle",
        3: ["red"],
        4: ["red"],
    }
    none = (None, None)
    alphas = {
        # red -> (0,0) in red box: hit; circle -> (3,3): miss; blue -> (2,2): hit; square -> (1,1): miss
        1: _one_hot(g, [none, (0, 0), (3, 3), none, none, (2, 2), (1, 1), (0, 0)], 8),  # extra row ignored
        # yellow matches no object -> any box (0,0,.5,1): (1,2) hit; triangle -> (2,3): miss
        2: _one_hot(g, [none, (1, 2), (2, 3)], 3),
        # two red objects: (2,2) centre (.625,.625) is only in the second box: hit
        3: _one_hot(g, [(2, 2)], 1),
        4: _one_hot(g, [(0, 0)], 1),
    }
    res = localization.attention_localization(words, alphas, objects, colors=COLORS, shapes=SHAPES, grid=g)
    assert res.num_words == 7
    assert res.rate == pytest.approx(4 / 7)
    union_red = 0.25 + 0.25 - 0.0625
    assert res.chance_rate == pytest.approx((4 * 0.25 + 0.5 + 0.5 + union_red) / 7)
    empty = localization.attention_localization({4: ["red"]}, alphas, objects, colors=COLORS, shapes=SHAPES, grid=g)
    assert empty.num_words == 0 and np.isnan(empty.rate)
    with pytest.raises(ValueError, match="grid"):
        localization.attention_localization({3: ["red"]}, {3: np.ones((1, 9))}, objects, colors=COLORS,
                                            shapes=SHAPES, grid=g)


def test_union_area_and_cell_centers():
    assert localization.union_area(np.array([[0, 0, .5, .5], [.25, .25, .75, .75]])) == pytest.approx(0.4375)
    assert localization.union_area(np.array([[0, 0, 1, 1], [.2, .2, .4, .4]])) == pytest.approx(1.0)
    assert localization.union_area(np.array([[-1, -1, .5, 2.0]])) == pytest.approx(0.5)  # clipped
    np.testing.assert_allclose(localization.cell_centers(2), [[.25, .25], [.25, .75], [.75, .25], [.75, .75]])


def test_attention_figure_png(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, size=(48, 64, 3), dtype=np.uint8)
    words = ["a", "red", "circle", "<eos>"]
    alphas = rng.dirichlet(np.ones(16), size=len(words)).astype(np.float32)
    path = tmp_path / "figs" / "attention.png"
    out = plots.save_attention_figure(str(path), image, words, alphas, grid=4, max_cols=3, panel_inches=1.5, dpi=40)
    assert out == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (3 * 60, 2 * 60)  # 5 panels in 3 columns of 1.5 in at 40 dpi
        assert np.asarray(im.convert("L")).std() > 5  # something was drawn
    with pytest.raises(ValueError, match="n_words=4"):
        plots.save_attention_figure(str(path), image, words, alphas[:3], grid=4)


def test_upsample_attention_peaks_at_the_attended_cell():
    alpha = np.zeros(16, np.float32)
    alpha[1 * 4 + 2] = 1.0  # row 1, col 2
    up = plots.upsample_attention(alpha, 4, 40, 80)
    assert up.shape == (40, 80) and up.min() == 0.0 and up.max() == pytest.approx(1.0)
    y, x = np.unravel_index(np.argmax(up), up.shape)
    assert 10 <= y < 20 and 40 <= x < 60  # inside the cell's pixel region


def test_training_curves_read_and_plot(tmp_path):
    import json
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 50, "split": "train", "entropy": 5.2, "loss": 3.0}, "not json",
            {"step": 100, "split": "train", "entropy": 4.9}, {"step": 100, "split": "test", "entropy": 1.0},
            {"step": 100, "split": "train", "entropy": 4.8}]          # a resumed run re-logs step 100
    (run / "metrics.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    steps, values = plots.read_curve(str(run), "entropy")
    np.testing.assert_array_equal(steps, [50, 100])
    np.testing.assert_allclose(values, [5.2, 4.8])
    with pytest.raises(ValueError, match=r"no 'train' row logs 'reward'.*\['entropy', 'loss'\]"):
        plots.read_curve(str(run), "reward")
    with pytest.raises(FileNotFoundError, match="training workdir"):
        plots.read_curve(str(tmp_path), "entropy")
    out = tmp_path / "fig" / "curves.png"
    assert plots.main(["--run", f"hard={run}", "--metric", "entropy", "--metric", "loss",
                       "--hline", "entropy=5.278", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.main(["--run", str(run), "--metric", "reward", "--out", str(out)]) == 2
