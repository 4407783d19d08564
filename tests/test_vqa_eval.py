"""VQAv2 from local files (`vlm_jax.data.vqav2`) and the VQA evaluator (`vlm_jax.evaluation.vqa`):
a hand-made VQAv2 folder (official JSON layouts, COCO file names, a missing and a corrupt image,
unmatched questions / annotations), the counted skips, the clear errors, and the evaluator's
accuracy on known answers through the whole predict-over-split path."""
import io
import json
import logging
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from vlm_jax.data import eval_input, vqav2
from vlm_jax.data.datasets import get_dataset
from vlm_jax.data.tokenizer import WordTokenizer
from vlm_jax.errors import DataError


def _answers(*pairs):
    out = []
    for word, n in pairs:
        out += [word] * n
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(out)]


def _write_vqa(root, *, questions=None, annotations=None):
    sub = root / "val2014"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in (1, 2):
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(sub / f"COCO_val2014_{i:012d}.jpg")
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(good, format="JPEG")
    (sub / f"COCO_val2014_{4:012d}.jpg").write_bytes(good.getvalue()[:100])        # truncated: corrupt
    qs = questions if questions is not None else [
        dict(image_id=1, question="Is the sky blue?", question_id=11),
        dict(image_id=1, question="What color is the cat black", question_id=12),
        dict(image_id=1, question="Who asked this?", question_id=99),               # no annotation
        dict(image_id=2, question="How many dogs two", question_id=21),
        dict(image_id=2, question="What is this?", question_id=22),                # no answers
        dict(image_id=3, question="Where is the image?", question_id=31),          # image missing
        dict(image_id=4, question="Is it corrupt?", question_id=41),               # image corrupt
    ]
    ann = annotations if annotations is not None else [
        dict(question_id=11, image_id=1, question_type="is the", answer_type="yes/no",
             multiple_choice_answer="yes", answers=_answers(("yes", 8), ("blue", 2))),
        dict(question_id=12, image_id=1, question_type="what color is the", answer_type="other",
             multiple_choice_answer="black", answers=_answers(("black", 10))),
        dict(question_id=21, image_id=2, question_type="how many", answer_type="number",
             multiple_choice_answer="2", answers=_answers(("2", 9), ("two", 1))),
        dict(question_id=22, image_id=2, question_type="what is", answer_type="other",
             multiple_choice_answer="", answers=[]),
        dict(question_id=31, image_id=3, question_type="where is", answer_type="other",
             multiple_choice_answer="sky", answers=_answers(("sky", 10))),
        dict(question_id=41, image_id=4, question_type="is it", answer_type="yes/no",
             multiple_choice_answer="no", answers=_answers(("no", 10))),
        dict(question_id=77, image_id=2, question_type="what", answer_type="other",     # no question
             multiple_choice_answer="x", answers=_answers(("x", 10))),
    ]
    (root / vqav2.question_file("val2014")).write_text(json.dumps({"data_subtype": "val2014", "questions": qs}))
    (root / vqav2.annotation_file("val2014")).write_text(json.dumps({"annotations": ann}))


def _config(tmp_path, manual):
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(
        name="vqav2", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual), builder_config="", image_size=16,
        num_train=0, num_val=0, num_test=0, max_caption_len=8, vocab_min_count=1, vocab_max_size=0, blind=False,
        worker_count=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    return c


TOKENIZER = WordTokenizer.build(["is the sky blue what color cat black how many dogs two yes"])


@pytest.fixture(scope="module")
def vqa_split(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vqa")
    _write_vqa(tmp / "manual")
    config = _config(tmp, tmp / "manual")
    return config, eval_input.make_eval_split(config, TOKENIZER, "val")


def test_vqav2_builder_keeps_ids_answers_and_counts_every_skip(vqa_split, caplog):
    config, split = vqa_split
    builder = get_dataset(config.data).builder
    assert builder.skipped == {} or builder.skipped["val"]["images"] == 2   # counts exist when built here
    table = split.question_table()
    assert sorted(table) == [11, 12, 21]
    assert table[11]["answers"] == ["yes"] * 8 + ["blue"] * 2 and table[11]["question_type"] == "is the"
    assert table[21]["answer_type"] == "number" and table[21]["image_id"] == 2
    assert split.image_ids.tolist() == [1, 2]
    # the counts of a fresh build (the fixture's builder may come from the cache)
    tmp = config.data.data_dir + "_fresh"
    b = vqav2.VQAv2(config="default", data_dir=tmp)
    import tensorflow_datasets as tfds
    with caplog.at_level(logging.INFO, logger="vlm_jax.data.vqav2"):
        b.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(manual_dir=config.data.manual_dir))
    assert b.skipped["val"] == dict(images=2, questions=3, missing_images=1, corrupt_images=1,
                                    questions_of_missing_images=2, questions_without_annotation=1,
                                    annotations_without_question=1, questions_without_answers=1, bad_questions=0,
                                    bad_annotations=0)
    assert "train" not in b.skipped and "train" not in b.info.splits      # no train2014 files: no split
    assert any("vqav2 val:" in r.getMessage() and "1 missing images" in r.getMessage() for r in caplog.records)


def test_vqav2_split_without_answers_is_a_clear_error(vqa_split):
    config, _ = vqa_split
    for split in ("test", "train"):          # no public answers / no files given
        with pytest.raises(DataError, match=f"no '{split}' split.*evals"):
            eval_input.make_eval_split(config, TOKENIZER, split)


@pytest.mark.parametrize("case", ["not_json", "partner_missing", "empty_folder"])
def test_vqav2_bad_files_name_the_file(tmp_path, case):
    manual = tmp_path / "manual"
    manual.mkdir()
    if case != "empty_folder":
        _write_vqa(manual)
    if case == "not_json":
        (manual / vqav2.annotation_file("val2014")).write_text("{not json")
        want = vqav2.annotation_file("val2014") + " is not valid JSON"
    elif case == "partner_missing":
        os.remove(manual / vqav2.question_file("val2014"))
        want = vqav2.question_file("val2014") + " not found"
    else:
        want = "manual_dir .* is empty or missing"
    with pytest.raises(DataError, match=want if case == "empty_folder" else want.replace(".", r"\.")):
        get_dataset(_config(tmp_path, manual).data)


def test_vqa_evaluator_scores_known_answers(vqa_split, tmp_path):
    """A stub model that answers the last word of each question: 'blue' (2 of 10 humans: 0.6 by the
    leave-one-out rule), 'black' (10 of 10: 1.0), 'two' (normalised to '2', 9 of 10: 1.0)."""
    from vlm_jax import sharding
    from vlm_jax.evaluation.vqa import VQAEvaluator
    _, split = vqa_split
    tp = 8

    def encode(question):
        ids = TOKENIZER.encode(question, add_special_tokens=False)[-tp:]
        prompt, mask = np.zeros((tp,), np.int32), np.zeros((tp,), bool)
        prompt[tp - len(ids):], mask[tp - len(ids):] = ids, True
        return {"prompt": prompt, "prompt_mask": mask}

    def predict(params, model_state, batch):
        last = batch["prompt"][:, -1:]
        return {"tokens": jnp.concatenate([last, jnp.full_like(last, TOKENIZER.eos_id)], axis=1)}

    mesh = sharding.create_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    ev = VQAEvaluator(name="vqa", every=0, predict=predict, input_keys=("image", "prompt", "prompt_mask"),
                      encode=encode, load_split=lambda: split, tokenizer=TOKENIZER, batch_size=2, max_questions=0,
                      mesh=mesh, prompt="{}")
    m = ev.run({}, {}, step=3, workdir=str(tmp_path), final=True)
    np.testing.assert_allclose(m["accuracy"], (0.6 + 1.0 + 1.0) / 3, atol=1e-9)
    assert m["accuracy/is the"] == pytest.approx(0.6) and m["accuracy/what color is the"] == 1.0
    assert m["accuracy_answer_type/number"] == 1.0 and m["num_questions"] == 3 and m["num_missing"] == 0
    out = tmp_path / "eval" / "step_3" / "vqa"
    results = json.loads((out / "results.json").read_text())
    assert {r["question_id"]: r["answer"] for r in results} == {11: "blue", 12: "black", 21: "two"}
    assert json.loads((out / "metrics.json").read_text())["dataset"].startswith("vqav2/")
