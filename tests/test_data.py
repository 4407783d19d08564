"""Tests of vlm_jax.data: synthetic + Karpathy builders, tokenizer, grain pipeline."""
import hashlib
import io
import json
import logging
import os
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
