"""MMC4-format interleaved documents from local JSONL (`vlm_jax.data.mmc4`): the builder's counted
skips, the image-to-sentence interleaving with the similarity threshold and the image limit, and
the documents as a Flamingo mixture source through the task's batches."""
import gzip
import io
import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from conftest import family_config
from vlm_jax.data import mmc4
from vlm_jax.data.interleaved import Chunk
from vlm_jax.errors import DataError


def _img(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (24, 18, 3), dtype=np.uint8)).save(path)


def _write_mmc4(root):
    (root / "images").mkdir(parents=True)
    for i in range(4):
        _img(root / "images" / f"im{i}.jpg", i)
    good = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good, format="JPEG")
    (root / "images" / "broken.jpg").write_bytes(good.getvalue()[:60])
    docs = [
        # 0: two images; im1 below a 0.24 threshold
        dict(text_list=["a red circle.", "a green square.", "two blue squares.", "the end."],
             image_info=[dict(image_name="im0.jpg", matched_text_index=1, matched_sim=0.31),
                         dict(image_name="im1.jpg", matched_text_index=2, matched_sim=0.12)]),
        # 1: assignment from the similarity matrix only; a corrupt and a nameless image entry
        dict(text_list=["first sentence.", "second sentence."],
             image_info=[dict(image_name="im2.jpg"), dict(image_name="broken.jpg", matched_text_index=0,
                                                          matched_sim=0.5), dict(matched_text_index=0)],
             similarity_matrix=[[0.1, 0.4], [0.3, 0.2], [0.3, 0.2]]),
        # 2: its only image is missing -> dropped
        dict(text_list=["lonely text."], image_info=[dict(image_name="nope.jpg", matched_text_index=0,
                                                          matched_sim=0.9)]),
        dict(text_list=["", "  "], image_info=[dict(image_name="im3.jpg", matched_text_index=0)]),   # no text
    ]
    lines = [json.dumps(d) for d in docs[:2]] + ["{this is not json", ""]
    (root / "shard_0.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(root / "shard_1.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(d) for d in docs[2:]) + "\n")
        f.write(json.dumps(dict(text_list=["two images here.", "more."],
                                image_info=[dict(image_name="im3.jpg", matched_text_index=0, matched_sim=0.3),
                                            dict(image_name="im0.jpg", matched_text_index=0, matched_sim=0.3)]))
                + "\n")


@pytest.fixture(scope="module")
def mmc4_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmc4")
    _write_mmc4(root / "manual")
    return root


def test_builder_counts_every_skip_and_keeps_assignments(mmc4_dir, caplog):
    b = mmc4.Mmc4Local(config="default", data_dir=str(mmc4_dir / "tfds_builder"))
    with caplog.at_level(logging.INFO, logger="vlm_jax.data.mmc4"):
        b.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(manual_dir=str(mmc4_dir / "manual")))
    assert b.skipped["train"] == dict(docs=3, images=5, bad_lines=1, docs_without_text=1, bad_image_entries=1,
                                      missing_images=1, corrupt_images=1, docs_without_images=1)
    assert any("first bad line: shard_0.jsonl:3" in r.getMessage() for r in caplog.records)
    docs = list(b.as_data_source(split="train"))
    assert [int(d["doc_id"]) for d in docs] == [0, 1, 2]
    assert list(docs[0]["image_sentence"]) == [1, 2] and np.allclose(docs[0]["image_sim"], [0.31, 0.12])
    assert list(docs[1]["image_sentence"]) == [1] and np.allclose(docs[1]["image_sim"], [0.4])   # argmax of its row
    assert len(docs[0]["images"]) == 2 and docs[0]["images"][0].shape == (24, 18, 3)


def test_no_documents_is_a_clear_error(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "readme.txt").write_text("not a shard")
    b = mmc4.Mmc4Local(config="default", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(DataError, match=r"no \*\.jsonl"):
        b.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))


def test_document_chunks_interleave_by_matched_sentence():
    texts = ["intro.", "more intro.", "a red circle.", "it is big.", "two squares.", "bye."]
    # images: k0 -> sentence 2, k1 -> sentence 4 (below threshold), k2 and k3 -> sentence 4
    chunks, order = mmc4.document_chunks(texts, [2, 4, 4, 4], [0.3, 0.1, 0.5, 0.6], threshold=0.24, max_images=8)
    assert order == [0, 2, 3]
    assert chunks == [Chunk("intro. more intro.", image=False, end=False),
                      Chunk("a red circle. it is big.", image=True, end=True),
                      Chunk("", image=True, end=True),
                      Chunk("two squares. bye.", image=True, end=True)]
    chunks, order = mmc4.document_chunks(texts, [2, 4, 4, 4], [0.3, 0.1, 0.5, 0.6], threshold=0.24, max_images=1)
    assert order == [0] and chunks[-1] == Chunk("a red circle. it is big. two squares. bye.")
    chunks, order = mmc4.document_chunks(texts, [2], [0.1], threshold=0.24, max_images=4)    # nothing above
    assert order == [] and chunks == [Chunk(" ".join(texts), image=False, end=False)]


def test_mmc4_as_a_flamingo_mixture_source(mmc4_dir, data_dir):
    from vlm_jax.models import flamingo as fl
    from vlm_jax.tasks import make_task
    from vlm_jax.tasks.flamingo import validate
    cfg = family_config("flamingo", data_dir, "tiny", model__freeze_lm="false", data__mixture__mmc4__weight="0.5",
                        data__mmc4__manual_dir=str(mmc4_dir / "manual"))
    validate(cfg)
    task = make_task(cfg, workdir=None)
    src = task._sources("train")["mmc4"]
    assert len(src) == 3
    ex = src[0]                          # doc 0: im0 kept (0.31), im1 dropped (0.12)
    tok = task.tokenizer
    ids = [int(t) for t in ex["tokens"] if t != tok.pad_id]
    assert ids.count(task.image_id) == 1 == int(ex["media_valid"].sum())
    first = ids.index(task.image_id)
    assert tok.decode(ids[1:first]) == "a red circle"        # text before the image: no loss
    label = np.asarray(fl.interleaved_label_mask(ex["tokens"][None], task.image_id, task.eoc_id, tok.pad_id))[0]
    assert not label[:first + 1].any() and label[first + 1]
    assert not np.allclose(ex["images"][0], 0) and np.allclose(ex["images"][1:], 0)
    batch = next(task.train_iterator(process_index=0, process_count=1))
    assert set(batch) == {"pairs", "docs", "nonce", "mmc4"}
    assert batch["mmc4"]["tokens"].shape == (8, task.token_len("mmc4"))
    assert ((batch["mmc4"]["tokens"] == task.image_id).sum(1) == batch["mmc4"]["media_valid"].sum(1)).all()
    bad = family_config("flamingo", data_dir, "tiny", model__freeze_lm="false", data__mixture__mmc4__weight="1")
    with pytest.raises(Exception, match="mmc4.manual_dir is empty"):
        validate(bad)
