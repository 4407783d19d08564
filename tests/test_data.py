"""Tests of vlm_jax.data: synthetic + Karpathy builders, tokenizer, grain pipeline."""
import hashlib
import io
import json
import logging
import os
import re
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vlm_jax.data import datasets, pipeline, synthetic
from vlm_jax.data.tokenizer_api import Tokenizer
from vlm_jax.data.karpathy import KarpathyCaptions
from vlm_jax.data.synthetic import COLOR_RGB, COLORS, QTYPES, SHAPES, SyntheticShapes
from vlm_jax.data.tokenizer import WordTokenizer, normalize

S = 48


def data_config(data_dir, **overrides):
    c = ml_collections.ConfigDict()
    c.seed = 3
    c.train = ml_collections.ConfigDict({"batch_size": 8})
    c.data = ml_collections.ConfigDict(dict(
        name="synthetic_shapes", data_dir=str(data_dir), manual_dir="", builder_config="",
        image_size=S, num_train=16, num_val=6, num_test=5, max_caption_len=24,
        vocab_min_count=1, vocab_max_size=0, blind=False, worker_count=0,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    for k, v in overrides.items():
        c.data[k] = v
    return c


def build(data_dir, **kw):
    b = SyntheticShapes(data_dir=str(data_dir), **kw)
    b.download_and_prepare(file_format="array_record")
    return b


def records(builder, split):
    src = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return [src[i] for i in range(len(src))]


def text(x):
    return x.decode() if isinstance(x, bytes) else x


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def syn(syn_dir):
    return build(syn_dir, image_size=S, num_train=16, num_val=6, num_test=5)


# ------------------------------------------------------------------ synthetic builder
def test_synthetic_features_and_captions(syn):
    assert syn.builder_config.name == f"s{S}_train16_val6_test5_seed0"
    assert set(syn.info.features.keys()) == {"image", "image_id", "captions", "objects",
                                             "questions"}
    src = syn.as_data_source(split="train")
    assert len(src) == 16
    for ex in src:
        assert ex["image"].shape == (S, S, 3) and ex["image"].dtype == np.uint8
        caps = [text(c) for c in ex["captions"]]
        assert len(set(caps)) == len(caps) >= 5
        objs = ex["objects"]
        n = len(objs["shape"])
        assert 1 <= n <= 4
        for cap in caps:  # every caption names every object's colour and shape
            words = normalize(cap)
            for c, s in zip(objs["color"], objs["shape"]):
                assert text(c) in words and text(s) in words, (cap, c, s)
        qs = ex["questions"]
        assert {text(q) for q in qs["qtype"]} <= set(QTYPES) and len(qs["question"]) >= 4
        count_q = [text(a) for q, a in zip(qs["question"], qs["answer"])
                   if text(q) == "how many objects are there?"]
        assert count_q == [str(n)]
        bbox = np.stack(objs["bbox"])
        assert bbox.shape == (n, 4) and bbox.min() >= 0 and bbox.max() <= 1
        assert np.all(bbox[:, 2] > bbox[:, 0]) and np.all(bbox[:, 3] > bbox[:, 1])
    # spatial relations and absolute positions appear among the templates
    all_caps = " | ".join(text(c) for ex in src for c in ex["captions"])
    for phrase in ("to the left of", "from left to right", "of the image", "there are"):
        assert phrase in all_caps


def test_bbox_matches_drawn_pixels(syn):
    src = syn.as_data_source(split="val")
    for ex in src:
        img, objs = ex["image"], ex["objects"]
        boxes = np.round(np.stack(objs["bbox"]) * S).astype(int)
        for color, (y0, x0, y1, x1) in zip(objs["color"], boxes):
            m = np.all(img == COLOR_RGB[text(color)], axis=-1)
            inside = m[y0:y1, x0:x1]
            assert inside.mean() > 0.4                         # the object fills its box
            assert inside[0].any() and inside[-1].any()        # box is tight
            assert inside[:, 0].any() and inside[:, -1].any()
        # every object-coloured pixel lies in the box of an object of that colour
        for color in set(text(c) for c in objs["color"]):
            m = np.all(img == COLOR_RGB[color], axis=-1)
            covered = np.zeros_like(m)
            for c, (y0, x0, y1, x1) in zip(objs["color"], boxes):
                if text(c) == color:
                    covered[y0:y1, x0:x1] = True
            assert not (m & ~covered).any()


def test_split_determinism(syn, syn_dir, tmp_path):
    again = build(tmp_path / "again", image_size=S, num_train=16, num_val=6, num_test=5)
    for split in ("train", "val", "test"):
        a, b = records(syn, split), records(again, split)
        assert [r["image"] for r in a] == [r["image"] for r in b]
        assert [list(r["captions"]) for r in a] == [list(r["captions"]) for r in b]
    images = {split: {r["image"] for r in records(syn, split)} for split in ("train", "val", "test")}
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]
    ids = [r["image_id"] for split in ("train", "val", "test") for r in records(syn, split)]
    assert sorted(ids) == list(range(27))
    other = build(syn_dir, image_size=S, num_train=16, num_val=6, num_test=5, seed=1)
    assert other.data_path != syn.data_path      # sizes/seed are encoded in the config name
    assert not {r["image"] for r in records(other, "train")} & images["train"]


def test_attribute_independence():
    """Chi-square contingency tests on ~1500 objects: colour, shape, size independent."""
    from scipy.stats import chi2_contingency
    objs, counts, lengths = [], [], []
    for i in range(600):
        _, o, caps, _ = synthetic.sample_scene(S, np.random.default_rng([7, 0, i]))
        objs += o
        counts.append(len(o))
        lengths += [len(normalize(c)) for c in caps]
    assert max(lengths) <= synthetic.MAX_CAPTION_WORDS
    col = np.array([COLORS.index(o.color) for o in objs])
    shp = np.array([SHAPES.index(o.shape) for o in objs])
    siz = np.array([o.size == "large" for o in objs], int)
    for a, b, na, nb in ((col, shp, len(COLORS), len(SHAPES)), (col, siz, len(COLORS), 2),
                         (shp, siz, len(SHAPES), 2)):
        table = np.zeros((na, nb))
        np.add.at(table, (a, b), 1)
        assert table.min() > 5
        assert chi2_contingency(table)[1] > 1e-3
    # marginals roughly uniform, object count uniform over 1..4
    assert np.bincount(col).min() > 0.6 * len(objs) / len(COLORS)
    assert np.bincount(counts, minlength=5)[1:].min() > 0.6 * 600 / 4


def test_builder_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        SyntheticShapes(data_dir=str(tmp_path), num_train=0)
    with pytest.raises(ValueError, match="not both"):
        SyntheticShapes(data_dir=str(tmp_path), num_train=4,
                        config=synthetic.SyntheticShapesConfig.make(num_train=4))


# ------------------------------------------------------------------------ tokenizer
def test_tokenizer_build_encode_decode(tmp_path):
    caps = ["A red circle, left of a BLUE square.", "a red-blue cross", "the circle's edge"]
    assert normalize(caps[0]) == ["a", "red", "circle", "left", "of", "a", "blue", "square"]
    assert normalize(caps[1]) == ["a", "red", "blue", "cross"]
    tok = WordTokenizer.build(caps, min_count=2)
    # counts: a=3, red=2, blue=2 (circle=1, circles=1 dropped); ties alphabetical
    assert tok.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "blue", "red"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert isinstance(tok, Tokenizer)
    assert tok.encode("A red square", add_special_tokens=False) == [4, 6, 3]
    assert tok.encode("red") == [1, 6, 2] and tok.template == ((1,), (2,))
    assert tok.encode("a red blue", max_len=4) == [1, 4, 6, 2]   # cut text, keep <eos>
    with pytest.raises(ValueError, match="no room"):
        tok.encode("a", max_len=2)
    capped = WordTokenizer.build(caps, min_count=1, max_size=6)
    assert capped.vocab_size == 6 and capped.words[4:] == ["a", "blue"]
    full = WordTokenizer.build(caps)
    assert full.decode(full.encode(caps[0])) == " ".join(normalize(caps[0]))
    # decode stops at eos and drops pad / bos
    assert tok.decode([1, 4, 6, 0, 5, 2, 6, 6]) == "a red blue"
    assert tok.decode([1, 4, 2, 6], skip_special_tokens=False) == "<bos> a <eos> red"
    assert tok.decode([1, 4, 2, 99]) == "a"   # nothing after <eos> is read
    padded = tok.encode_padded("a red blue circle", max_len=8)
    assert padded.dtype == np.int32 and padded.tolist() == [1, 4, 6, 5, 3, 2, 0, 0]
    assert tok.encode_padded("a red blue a red", max_len=5).tolist() == [1, 4, 6, 5, 2]
    ids, mask = tok.pad_batch([tok.encode("a red blue a"), tok.encode("red")], 4)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ids.tolist() == [[1, 4, 6, 2], [1, 6, 2, 0]]          # long row keeps its <eos>
    assert mask.tolist() == [[True] * 4, [True, True, True, False]]
    ids, mask = tok.pad_batch([[1, 6], [4, 5, 6, 4, 5]], 3, side="left")
    assert ids.tolist() == [[0, 1, 6], [4, 5, 6]] and mask.tolist() == [[False, True, True],
                                                                       [True] * 3]
    with pytest.raises(ValueError, match="side="):
        tok.pad_batch([[1]], 3, side="middle")
    path = str(tmp_path / "v" / "vocab.json")
    full.save(path)
    assert WordTokenizer.load(path) == full
    with open(path, "w") as f:
        json.dump({"words": ["x"]}, f)
    with pytest.raises(ValueError, match="delete it"):
        WordTokenizer.load(path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([1, 99])


# ------------------------------------------------------------------------- pipeline
@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipe_tfds")


@pytest.fixture(scope="module")
def tok(pipe_dir, tmp_path_factory):
    return pipeline.get_tokenizer(data_config(pipe_dir), str(tmp_path_factory.mktemp("wd")))


def pair_key(image, tokens):
    return hashlib.md5(np.ascontiguousarray(image).tobytes()).hexdigest() + str(tokens.tolist())


def all_pairs(cfg, tok):
    """Keys of every (image, caption) training pair, straight from the data source."""
    ds = pipeline.get_dataset(cfg.data)
    prep = pipeline.ImagePreprocessor(S, cfg.data.mean, cfg.data.std)
    src, meta = ds.source("train"), ds.meta("train")
    return {pair_key(prep(src[r]["image"]), tok.encode_padded(c, cfg.data.max_caption_len + 2))
            for r, caps in enumerate(meta.captions) for c in caps}


def test_get_tokenizer_prepares_builds_and_reloads(pipe_dir, tmp_path, caplog):
    cfg = data_config(pipe_dir)
    with caplog.at_level(logging.INFO, logger="vlm_jax.data.pipeline"):
        tok = pipeline.get_tokenizer(cfg, str(tmp_path))
    assert os.path.exists(tmp_path / "vocab.json")
    assert set(COLORS) | set(SHAPES) <= set(tok.words)
    cfg.data.vocab_min_count = 1000  # ignored: the saved vocabulary wins
    assert pipeline.get_tokenizer(cfg, str(tmp_path)) == tok


def test_train_iterator_batches_and_state(pipe_dir, tok):
    cfg = data_config(pipe_dir)
    it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
    b = next(it)
    assert b["image"].shape == (8, S, S, 3) and b["image"].dtype == np.float32
    assert b["tokens"].shape == (8, 26) and b["tokens"].dtype == np.int32
    assert b["image_id"].shape == (8,) and b["image_id"].dtype == np.int64
    assert sorted(b.keys()) == ["image", "image_id", "tokens"]
    assert np.all(b["tokens"][:, 0] == tok.bos_id)
    assert np.all((b["tokens"] == tok.eos_id).sum(1) == 1)
    # normalisation (x/255 - 0.5)/0.25: background gray level 70..110 -> about -0.9..-0.27
    assert -2.01 <= b["image"].min() and b["image"].max() <= 2.01
    # 16 images x 6 captions = 96 pairs = 12 batches/epoch; epoch = every pair exactly once
    epoch1 = [b] + [next(it) for _ in range(11)]
    keys1 = [pair_key(i, t) for x in epoch1 for i, t in zip(x["image"], x["tokens"])]
    assert len(set(keys1)) == 96 and set(keys1) == all_pairs(cfg, tok)
    # image_id names the image in the row: 16 images, each with its 6 captions once per epoch
    ds = pipeline.get_dataset(cfg.data)
    prep = pipeline.ImagePreprocessor(S, cfg.data.mean, cfg.data.std)
    by_id = {int(i): prep(ds.images("train")[r]) for r, i in enumerate(ds.meta("train").image_ids)}
    for x in epoch1:
        for img, i in zip(x["image"], x["image_id"]):
            np.testing.assert_array_equal(img, by_id[int(i)])
    ids1 = np.concatenate([x["image_id"] for x in epoch1])
    assert sorted(np.unique(ids1, return_counts=True)[1].tolist()) == [6] * 16
    for _ in range(9):
        next(it)
    state = it.get_state()         # mid epoch 2, next batches cross into epoch 3
    expected = [next(it) for _ in range(5)]
    restored = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
    restored.set_state(state)
    for e in expected:
        got = next(restored)
        np.testing.assert_array_equal(got["tokens"], e["tokens"])
        np.testing.assert_array_equal(got["image"], e["image"])
        np.testing.assert_array_equal(got["image_id"], e["image_id"])
    # a state saved under another data config is refused (grain compares sampler/source)
    blind = pipeline.make_train_iterator(data_config(pipe_dir, blind=True), tok,
                                         process_index=0, process_count=1)
    with pytest.raises(ValueError, match="DataSource in checkpoint does not match"):
        blind.set_state(state)
    # the same seed repeats, another seed differs
    again = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
    np.testing.assert_array_equal(next(again)["tokens"], epoch1[0]["tokens"])
    cfg.seed = 4
    other = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
    assert not np.array_equal(next(other)["tokens"], epoch1[0]["tokens"])


def test_per_process_sharding(pipe_dir, tok):
    cfg = data_config(pipe_dir)
    keys = []
    for p in range(2):
        it = pipeline.make_train_iterator(cfg, tok, process_index=p, process_count=2)
        batches = [next(it) for _ in range(12)]  # 48 pairs per process = one shard epoch
        assert batches[0]["image"].shape == (4, S, S, 3)
        keys.append([pair_key(i, t) for x in batches for i, t in zip(x["image"], x["tokens"])])
    assert len(set(keys[0])) == len(set(keys[1])) == 48
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) == all_pairs(cfg, tok)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=3)


def test_blind_changes_images_not_captions(pipe_dir, tok):
    cfg = data_config(pipe_dir)
    seeing = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
    blind_cfg = data_config(pipe_dir, blind=True)
    blind = pipeline.make_train_iterator(blind_cfg, tok, process_index=0, process_count=1)
    blind2 = pipeline.make_train_iterator(blind_cfg, tok, process_index=0, process_count=1)
    ds = pipeline.get_dataset(cfg.data)
    prep = pipeline.ImagePreprocessor(S, cfg.data.mean, cfg.data.std)
    train_images = [prep(ds.images("train")[r]) for r in range(16)]
    train_ids = ds.meta("train").image_ids
    paired = {}   # caption tokens -> set of image indices it was shown with
    for step in range(24):   # two epochs
        a, b, b2 = next(seeing), next(blind), next(blind2)
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(b["image"], b2["image"])  # deterministic
        assert b.keys() == a.keys()
        for x, y, t, i_a, i_b in zip(a["image"], b["image"], b["tokens"], a["image_id"],
                                     b["image_id"]):
            assert not np.array_equal(x, y) and i_a != i_b       # another image ...
            shown = [i for i, im in enumerate(train_images) if np.array_equal(im, y)]
            assert len(shown) == 1                               # ... of the training set
            assert i_b == train_ids[shown[0]]                    # image_id = the one shown
            paired.setdefault(tuple(t), set()).add(shown[0])
        if step == 5:
            state = blind.get_state()
            expected = [next(blind2)["image"] for _ in range(2)]
            restored = pipeline.make_train_iterator(blind_cfg, tok, process_index=0,
                                                    process_count=1)
            restored.set_state(state)
            for e in expected:
                np.testing.assert_array_equal(next(restored)["image"], e)
            next(blind), next(seeing)  # keep all three iterators in step
            next(blind), next(seeing)
    # fresh random images per epoch: most captions met two different images in two epochs
    assert sum(len(v) == 2 for v in paired.values()) > len(paired) // 2


def test_caption_pattern_trains_on_the_matching_captions_only(pipe_dir, tok):
    """config.data.caption_pattern: an epoch is exactly the training pairs whose caption the expression finds."""
    located = r"\b(at|on|in) the (top|middle|bottom|left|center|right)\b"
    cfg = data_config(pipe_dir, caption_pattern=located)
    ds = pipeline.get_dataset(cfg.data)
    prep = pipeline.ImagePreprocessor(S, cfg.data.mean, cfg.data.std)
    src, meta = ds.source("train"), ds.meta("train")
    want = {pair_key(prep(src[r]["image"]), tok.encode_padded(c, cfg.data.max_caption_len + 2))
            for r, caps in enumerate(meta.captions) for c in caps if re.search(located, c)}
    assert 16 <= len(want) < 96              # every image has a located caption; the others are left out
    it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
    n = len(want) // 8                       # whole batches within the first epoch
    got = [pair_key(i, t) for b in (next(it) for _ in range(n)) for i, t in zip(b["image"], b["tokens"])]
    assert set(got) <= want and len(set(got)) == len(got) == 8 * n
    with pytest.raises(ValueError, match=r"caption_pattern='\(unclosed'.*not a regular expression"):
        pipeline.validate_data_config(data_config(pipe_dir, caption_pattern="(unclosed").data)
    with pytest.raises(ValueError, match=r"caption_pattern='zebra'.*finds none of the 96"):
        pipeline.make_train_iterator(data_config(pipe_dir, caption_pattern="zebra"), tok, process_index=0,
                                     process_count=1)


def test_caption_pattern_repeat_oversamples_and_keeps_the_rest(pipe_dir):
    """caption_pattern_repeat=n: every caption stays, each one the pattern finds appears n times; 0 is the filter."""
    from vlm_jax.data.train_input import select_captions
    caps = [["a red circle at the top", "a red circle"], ["two objects"], ["a cross on the left"]]
    rx = r"\b(at|on) the (top|left)\b"
    assert select_captions(caps, rx) == [["a red circle at the top"], [], ["a cross on the left"]]
    assert select_captions(caps, rx, repeat=3) == [["a red circle at the top"] * 3 + ["a red circle"],
                                                  ["two objects"], ["a cross on the left"] * 3]
    assert select_captions(caps, rx, repeat=1) == caps
    assert select_captions(caps, "", repeat=3) is caps
    for bad_value, message in ((-1, "must be an int >= 0"), (1.5, "must be an int >= 0"),
                               (2, "caption_pattern is ''")):
        cfg = data_config(pipe_dir, caption_pattern="" if bad_value == 2 else rx, caption_pattern_repeat=bad_value)
        with pytest.raises(ValueError, match=f"caption_pattern_repeat.*{message}"):
            pipeline.validate_data_config(cfg.data)


def test_eval_split(pipe_dir, tok):
    cfg = data_config(pipe_dir)
    ev = pipeline.load_eval_split(cfg, tok, "val")
    assert len(ev) == 6 and ev.image_ids.tolist() == list(range(16, 22))
    ds = pipeline.get_dataset(cfg.data)
    assert ev.references[16] == list(ds.meta("val").captions[0]) and len(ev.references[16]) == 6
    assert {o["color"] for o in ev.objects[16]} <= set(COLORS)
    batches = list(ev.batches(4))
    assert [x["valid"].tolist() for x in batches] == [[True] * 4, [True, True, False, False]]
    assert batches[1]["image_id"].tolist() == [20, 21, -1, -1]
    assert np.all(batches[1]["image"][2:] == 0)
    raw = ev.get_image(17)
    assert raw.shape == (S, S, 3) and raw.dtype == np.uint8
    np.testing.assert_allclose(batches[0]["image"][1], (raw / 255 - 0.5) / 0.25, atol=1e-5)
    # two processes split every global batch; together they cover the split once
    rows = [[i for x in ev.batches(4, process_index=p, process_count=2)
             for i, v in zip(x["image_id"], x["valid"]) if v] for p in range(2)]
    assert rows == [[16, 17, 20, 21], [18, 19]]
    tokens = next(ev.batches(2, with_tokens=True))["tokens"]
    assert tok.decode(tokens[0]) == " ".join(normalize(ev.references[16][0]))
    assert len(ev.subset(2)) == 2 and set(ev.subset(2).references) == {16, 17}


def test_data_config_errors(pipe_dir):
    cfg = data_config(pipe_dir, name="coco")
    with pytest.raises(ValueError, match=r"config.data.name='coco'"):
        pipeline.validate_data_config(cfg.data)
    cfg = data_config(pipe_dir, name="karpathy_captions", builder_config="flickr9k")
    with pytest.raises(ValueError, match="builder_config"):
        pipeline.validate_data_config(cfg.data)
    cfg = data_config(pipe_dir, std=(0.5, 0.5))
    with pytest.raises(ValueError, match="std"):
        pipeline.validate_data_config(cfg.data)


# ------------------------------------------------------------------ Karpathy builder
def _karpathy_fixture(root):
    """Flickr8k-style manual_dir from real photos shipped with skimage/sklearn/matplotlib."""
    import matplotlib
    import skimage.data
    from sklearn.datasets import load_sample_images

    img_dir = root / "Flicker8k_Dataset"
    img_dir.mkdir(parents=True)
    photos = {name: getattr(skimage.data, name)() for name in
              ("astronaut", "coffee", "chelsea", "rocket", "camera")}
    for name, arr in photos.items():
        Image.fromarray(arr).save(img_dir / f"{name}.jpg" if name != "camera"
                                  else img_dir / "camera.png")  # camera: grayscale PNG
    china, flower = load_sample_images().filenames
    shutil.copy(china, img_dir / "china.jpg")
    (root / "more").mkdir()
    shutil.copy(flower, root / "more" / "flower.jpg")  # found via "filepath"
    shutil.copy(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"),
                img_dir / "grace_hopper.jpg")
    good = io.BytesIO()
    Image.fromarray(photos["coffee"]).save(good, format="JPEG")
    (img_dir / "corrupt.jpg").write_bytes(good.getvalue()[:400])  # truncated JPEG

    def entry(i, fn, split, caps, **kw):
        return dict(filename=fn, imgid=i, split=split,
                    sentences=[{"raw": c, "tokens": c.lower().split()} for c in caps], **kw)

    images = [
        entry(0, "astronaut.jpg", "train", ["An astronaut with a flag.", "A woman in a suit."]),
        entry(1, "coffee.jpg", "train", ["A cup of coffee.", "  "]),          # 1 empty caption
        entry(2, "chelsea.jpg", "restval", ["A tabby cat looks to the side."]),
        entry(3, "missing.jpg", "train", ["This file does not exist."]),      # missing image
        entry(4, "corrupt.jpg", "train", ["A corrupt file."]),                # corrupt image
        entry(5, "camera.png", "train", ["A man with a camera on a tripod."]),
        entry(6, "rocket.jpg", "val", ["A rocket on the launch pad."]),
        entry(7, "china.jpg", "val", ["A pagoda among trees."]),
        entry(8, "flower.jpg", "test", ["A flower with a bee."], filepath="more"),
        entry(9, "grace_hopper.jpg", "test", ["A woman in uniform."]),
    ]
    (root / "dataset_flickr8k.json").write_text(json.dumps({"images": images}))


def test_karpathy_builder_and_pipeline(tmp_path, caplog):
    manual = tmp_path / "manual"
    _karpathy_fixture(manual)
    builder = KarpathyCaptions(config="flickr8k", data_dir=str(tmp_path / "tfds"))
    with caplog.at_level(logging.INFO, logger="vlm_jax.data.karpathy"):
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert builder.skipped["train"] == dict(images=4, captions=5, missing_images=1,
                                            corrupt_images=1, empty_captions=1,
                                            images_without_captions=0)
    assert builder.skipped["val"]["images"] == 2 and builder.skipped["test"]["images"] == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "vlm_jax.data.karpathy"]
    assert [sum(f"flickr8k {s}:" in m for m in lines) for s in ("train", "val", "test")] == [1, 1, 1]
    assert any("flickr8k train:" in m and "1 missing images, 1 corrupt images, 1 empty captions"
               in m for m in lines)
    src = builder.as_data_source(split="train")
    by_id = {int(ex["image_id"]): ex for ex in src}
    assert set(by_id) == {0, 1, 2, 5}                  # restval -> train
    assert [text(c) for c in by_id[1]["captions"]] == ["A cup of coffee."]
    assert by_id[5]["image"].shape == (512, 512, 3)    # grayscale PNG stored as RGB
    assert len(by_id[0]["objects"]["shape"]) == 0 and len(by_id[0]["questions"]["answer"]) == 0
    raw = {int(ex["image_id"]): ex["image"] for ex in records(builder, "train")}
    assert raw[0] == (manual / "Flicker8k_Dataset" / "astronaut.jpg").read_bytes()  # not re-encoded
    shapes = {int(ex["image_id"]): ex["image"].shape for split in ("val", "test")
              for ex in builder.as_data_source(split=split)}
    # longer side > 512 is downscaled to 512, aspect kept
    assert shapes == {6: (342, 512, 3), 7: (342, 512, 3), 8: (342, 512, 3), 9: (512, 437, 3)}

    cfg = data_config(tmp_path / "tfds", name="karpathy_captions", builder_config="flickr8k",
                      manual_dir=str(manual), image_size=32, num_train=0, num_val=0,
                      num_test=1)
    cfg.train.batch_size = 4
    tok = pipeline.get_tokenizer(cfg, "")
    assert "astronaut" in tok.words and "pagoda" not in tok.words  # train captions only
    batch = next(pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["tokens"].shape == (4, 26)
    ev = pipeline.load_eval_split(cfg, tok, "test")
    assert len(ev) == 1 and ev.get_image(int(ev.image_ids[0])).shape == (32, 32, 3)
    assert ev.objects[int(ev.image_ids[0])] == []


def test_multiprocess_prepare_barrier(tmp_path, monkeypatch):
    """With 2 JAX processes, process 1 waits at a barrier for process 0, then re-opens the
    builder; with nothing on its disk (no shared data_dir) it builds its own copy."""
    import jax
    from jax.experimental import multihost_utils
    calls = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", calls.append)
    cfg = data_config(tmp_path, num_train=3, num_val=2, num_test=2)
    builder = datasets.prepare_once(cfg.data)
    assert calls == ["vlm_jax.data: prepared synthetic_shapes/s48_train3_val2_test2_seed0/1.0.0"]
    assert builder.is_prepared() and len(builder.as_data_source(split="train")) == 3


def test_concurrent_runs_prepare_the_dataset_once(tmp_path, monkeypatch):
    """Two runs on one machine asking for the same unprepared dataset: the second waits on the
    build lock while the first builds, then opens the finished dataset instead of building a
    second copy (which used to fail renaming onto the first's folder)."""
    import threading
    builds = []
    real = datasets.SyntheticShapes.download_and_prepare

    def counting(self, *a, **k):
        builds.append(threading.current_thread().name)
        return real(self, *a, **k)

    monkeypatch.setattr(datasets.SyntheticShapes, "download_and_prepare", counting)
    cfg = data_config(tmp_path, num_train=3, num_val=2, num_test=2)
    out = {}
    first = datasets.make_builder(cfg.data)
    with datasets._build_lock(first):           # run 1 holds the lock ...
        second = threading.Thread(name="run2", target=lambda: out.update(b=datasets.prepare_once(cfg.data)))
        second.start()
        second.join(timeout=3)
        assert second.is_alive()                  # ... run 2 waits for it
        datasets.ensure_prepared(first)           # run 1 builds
    second.join(timeout=120)
    assert not second.is_alive()
    assert builds == ["MainThread"]               # one build, by run 1
    assert out["b"].is_prepared() and len(out["b"].as_data_source(split="train")) == 3


# ------------------------------------------------------------------------- mixtures
class _Records:
    """Toy grain source: record i -> {x: f32 shape filled with offset + i, id: i64 offset + i}."""

    def __init__(self, n, offset, shape=(2,), extra=None):
        self.n, self.offset, self.shape, self.extra = n, offset, shape, extra

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        out = {"x": np.full(self.shape, self.offset + i, np.float32),
               "id": np.int64(self.offset + i)}
        if self.extra:
            out[self.extra] = np.int32(0)
        return out

    def __repr__(self):
        return f"_Records({self.n}, {self.offset})"


def _mix_sources():
    from vlm_jax.data.mixture import MixtureSource
    return [MixtureSource("a", _Records(50, 0), 0.5), MixtureSource("b", _Records(21, 1000), 3.0),
            MixtureSource("c", _Records(30, 2000), 2.0)]


def _mix(sources=None, **kw):
    from vlm_jax.data.mixture import make_mixture_iterator
    args = dict(global_batch_size=32, seed=0, process_index=0, process_count=1)
    args.update(kw)
    return make_mixture_iterator(_mix_sources() if sources is None else sources, **args)


def test_mixture_proportions_epochs_and_determinism():
    it = _mix()
    batches = [next(it) for _ in range(200)]
    b = batches[0]
    assert b["x"].shape == (32, 2) and b["x"].dtype == np.float32
    assert b["source_index"].shape == (32,) and b["source_index"].dtype == np.int32
    assert sorted(b) == ["id", "source_index", "x"]
    k = np.concatenate([x["source_index"] for x in batches])
    ids = np.concatenate([x["id"] for x in batches])
    np.testing.assert_array_equal(ids // 1000, k)          # source_index = the row's source
    # weights 0.5 : 3 : 2 -> p = (1/11, 6/11, 4/11). Over n = 6400 draws the count of source
    # k is Binomial(n, p_k): |count - n p_k| <= 4.5 sd fails for a correct sampler with
    # probability < 1e-5 (the seed is fixed, so the test is deterministic); a mis-weighted
    # sampler (e.g. p swapped between b and c: 1164 draws off) is > 8 sd away.
    n, p = len(k), np.array([0.5, 3.0, 2.0]) / 5.5
    counts = np.bincount(k, minlength=3)
    assert np.all(np.abs(counts - n * p) <= 4.5 * np.sqrt(n * p * (1 - p))), counts
    # independent draws, not a fixed interleave: per-batch counts of source b vary like a
    # Binomial(32, 6/11) (variance 7.93); the sample variance of 200 batches has relative
    # sd sqrt(2/199) = 0.1, so [0.6, 1.5] x 7.93 is > 4 sd wide on each side
    per_batch = np.array([(x["source_index"] == 1).sum() for x in batches])
    assert 0.6 * 32 * p[1] * (1 - p[1]) <= per_batch.var(ddof=1) <= 1.5 * 32 * p[1] * (1 - p[1])
    # each source repeats forever, every epoch is a fresh permutation of its records
    b_ids = ids[k == 1]
    epochs = [b_ids[i * 21:(i + 1) * 21] for i in range(len(b_ids) // 21)]
    assert len(epochs) > 100
    assert all(sorted(e.tolist()) == list(range(1000, 1021)) for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) == len(epochs)
    # same seed -> same batches; another seed -> others
    again = _mix()
    for x in batches[:5]:
        np.testing.assert_array_equal(next(again)["id"], x["id"])
    assert not np.array_equal(next(_mix(seed=1))["id"], batches[0]["id"])


def test_mixture_resume_is_exact():
    it = _mix()
    for _ in range(9):            # mid epoch of every source (ids of b: 21 per epoch)
        next(it)
    state = json.loads(json.dumps(it.get_state()))   # what the checkpoint stores
    expected = [next(it) for _ in range(6)]
    restored = _mix()
    restored.set_state(state)
    for e in expected:
        got = next(restored)
        for key in ("x", "id", "source_index"):
            np.testing.assert_array_equal(got[key], e[key])
    # a resume far into the stream (past the first 4096-draw block) is exact as well
    far = _mix(global_batch_size=512)
    for _ in range(20):
        next(far)
    state, want = far.get_state(), next(far)
    restored = _mix(global_batch_size=512)
    restored.set_state(state)
    np.testing.assert_array_equal(next(restored)["id"], want["id"])


def test_mixture_process_shards_are_disjoint():
    seen = []
    for p in range(2):
        it = _mix(process_index=p, process_count=2)
        batches = [next(it) for _ in range(100)]
        assert batches[0]["x"].shape == (16, 2)
        ids = np.concatenate([x["id"] for x in batches])
        seen.append({k: set(ids[ids // 1000 == k].tolist()) for k in range(3)})
    for k, n in enumerate((50, 21, 30)):
        offset = 1000 * k
        assert not seen[0][k] & seen[1][k]
        # contiguous shards of n // 2 records; the odd record of b (id 1020) is never read
        assert seen[0][k] == set(range(offset, offset + n // 2))
        assert seen[1][k] == set(range(offset + n // 2, offset + 2 * (n // 2)))


def test_mixture_nested_batches():
    from vlm_jax.data.mixture import MixtureSource
    sources = [MixtureSource("pairs", _Records(40, 0, (3,)), batch_size=8),
               MixtureSource("docs", _Records(12, 1000, (5, 4)), weight=0.2, batch_size=4)]
    for p in range(2):
        it = _mix(sources, process_index=p, process_count=2, nested=True)
        b = next(it)
        assert sorted(b) == ["docs", "pairs"]
        assert b["pairs"]["x"].shape == (4, 3) and b["pairs"]["id"].shape == (4,)
        assert b["docs"]["x"].shape == (2, 5, 4) and b["docs"]["id"].dtype == np.int64
        assert "source_index" not in b["pairs"]
        assert set(b["docs"]["id"].tolist()) <= set(range(1000 + 6 * p, 1006 + 6 * p))
    for _ in range(4):            # docs: 6 records per shard, 2 per batch -> mid epoch 2
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    restored = _mix(sources, process_index=1, process_count=2, nested=True)
    restored.set_state(json.loads(json.dumps(state)))
    for e in expected:
        got = next(restored)
        for name in ("pairs", "docs"):
            np.testing.assert_array_equal(got[name]["x"], e[name]["x"])
    # a source batch_size None takes the global one
    plain = [MixtureSource("pairs", _Records(40, 0, (3,)))]
    assert next(_mix(plain, global_batch_size=6, nested=True))["pairs"]["x"].shape == (6, 3)


def test_mixture_errors():
    from vlm_jax.data.mixture import MixtureSource
    a = MixtureSource("a", _Records(10, 0))
    with pytest.raises(ValueError, match="'wide' yields .*'x'.*where 'a' yields"):
        _mix([a, MixtureSource("wide", _Records(10, 100, (3,)))])
    with pytest.raises(ValueError, match="'more' yields .*'tag'.*same keys"):
        _mix([a, MixtureSource("more", _Records(10, 100, extra="tag"))])
    with pytest.raises(ValueError, match="already has a 'source_index'"):
        _mix([MixtureSource("s", _Records(10, 0, extra="source_index"))])
    with pytest.raises(ValueError, match="'b': weight=0 must be"):
        _mix([a, MixtureSource("b", _Records(10, 100), weight=0)])
    with pytest.raises(ValueError, match="'b': weight=nan"):
        _mix([a, MixtureSource("b", _Records(10, 100), weight=float("nan"))])
    with pytest.raises(ValueError, match="'a' is used twice"):
        _mix([a, a])
    with pytest.raises(ValueError, match="sources` is empty"):
        _mix([])
    with pytest.raises(ValueError, match="nested=True only"):
        _mix([MixtureSource("a", _Records(10, 0), batch_size=4)])
    with pytest.raises(ValueError, match="global_batch_size=30 must be a positive multiple"):
        _mix([a], global_batch_size=30, process_count=4, process_index=0)
    with pytest.raises(ValueError, match="batch_size of mixture source 'a'"):
        _mix([MixtureSource("a", _Records(10, 0), batch_size=3)], process_count=2, nested=True)
    with pytest.raises(ValueError, match="'tiny' has 1 records, fewer than the 2 processes"):
        _mix([a, MixtureSource("tiny", _Records(1, 100))], process_count=2)
    with pytest.raises(ValueError, match="process_index=2 must be in"):
        _mix([a], process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seed=-1"):
        _mix([a], seed=-1)


def test_mixture_worker_processes_resume_exactly():
    """worker_count=1: the pipeline pickles into a grain worker, gives the in-process batches,
    and its (JSON-able) state resumes exactly."""
    it = _mix(worker_count=1)
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    in_process = _mix()
    for x in first:
        np.testing.assert_array_equal(next(in_process)["id"], x["id"])
    restored = _mix(worker_count=1)
    restored.set_state(state)
    np.testing.assert_array_equal(next(restored)["id"], expected["id"])
    del it, restored
