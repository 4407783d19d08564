"""VQAv2 (Goyal et al. 2017) from its official local files: a TFDS builder.

Reads the questions JSON, the annotations JSON and the COCO images of each split from
`manual_dir` and writes one record per image with the shared caption features
(docs/interfaces.md "Data"; captions and objects empty) plus, per question, its official id,
the ten human answers and the answer type, so `vlm_jax.evaluation.vqa` can score with the
official leave-one-out accuracy:

  questions[k] = {question, answer (multiple_choice_answer), qtype (question_type, e.g.
                  'what color is the'), question_id, answers (the 10 human answers, whitespace
                  collapsed, joined by newlines), answer_type ('yes/no' | 'number' | 'other')}

Splits: 'train' (train2014) and 'val' (val2014); VQAv2's test-dev / test-std have no public
answers, so there is no 'test' split (zero-shot VQA in the BLIP-2 paper is reported on
test-dev through the evaluation server; this builder scores val locally). Questions without
an annotation, annotations without a question, images that are missing or cannot be decoded
and questions with no answers are skipped and counted (one log line per split;
`builder.skipped[split]`). Images larger than `max_side` are downscaled (aspect kept) and stored
as JPEG.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os

import tensorflow_datasets as tfds

from vlm_jax.data.common import PackageBuilderMixin, caption_features, load_image_jpeg, report_counts

log = logging.getLogger(__name__)

SPLIT_FILES = {"train": "train2014", "val": "val2014"}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put the VQAv2 files (https://visualqa.org/download.html) and the COCO 2014 images into
`manual_dir` (config.data.manual_dir):

  manual_dir/
    v2_OpenEnded_mscoco_train2014_questions.json   v2_mscoco_train2014_annotations.json
    v2_OpenEnded_mscoco_val2014_questions.json     v2_mscoco_val2014_annotations.json
    train2014/COCO_train2014_000000000009.jpg ...  val2014/COCO_val2014_000000000042.jpg ...

A split whose two JSON files are both absent is not written (e.g. val only, for zero-shot
evaluation); one present without the other is an error. An image is looked up at
manual_dir/<subtype>/COCO_<subtype>_<image_id:012d>.jpg, then manual_dir/<subtype>/<image_id>.jpg
(<subtype> train2014 | val2014). Symlinks are fine.
"""


def question_file(subtype: str) -> str:
    return f"v2_OpenEnded_mscoco_{subtype}_questions.json"


def annotation_file(subtype: str) -> str:
    return f"v2_mscoco_{subtype}_annotations.json"


@dataclasses.dataclass(eq=False)
class VQAv2Config(tfds.core.BuilderConfig):
    max_side: int = 512          # images with a longer side are downscaled; 0 = keep size


def _read_json(path: str, what: str, key: str) -> list:
    from vlm_jax.errors import DataError
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-download the VQAv2 {what} file into "
                        "--config.data.manual_dir.") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise DataError(f"{path}: expected a JSON object with a {key!r} list (the official VQAv2 {what} "
                        "format).")
    return data[key]


class VQAv2(PackageBuilderMixin, tfds.core.GeneratorBasedBuilder):
    """VQAv2 questions with their ten human answers, one record per COCO image."""

    name = "vqav2"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [VQAv2Config(name="default", description="VQAv2 train2014 / val2014")]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.skipped: dict[str, dict[str, int]] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__.split("\n\n")[0],
            features=caption_features((None, None, 3), "jpeg", vqa_answers=True),
            homepage="https://visualqa.org/", disable_shuffling=True)   # records in image_id order

    def _split_generators(self, dl_manager):
        from vlm_jax.errors import DataError
        root = os.fspath(dl_manager.manual_dir)
        gens, found = {}, False
        for split, sub in SPLIT_FILES.items():
            qp, ap = os.path.join(root, question_file(sub)), os.path.join(root, annotation_file(sub))
            have = (os.path.isfile(qp), os.path.isfile(ap))
            if have == (False, False):       # e.g. val only, for zero-shot evaluation (TFDS has no empty splits)
                continue
            if not all(have):
                missing = qp if not have[0] else ap
                raise DataError(f"vqav2 {split}: {missing} not found (its partner file is there).\n"
                                + MANUAL_DOWNLOAD_INSTRUCTIONS)
            found = True
            gens[split] = self._generate_examples(root, split, sub, _read_json(qp, "questions", "questions"),
                                                  _read_json(ap, "annotations", "annotations"))
        if not found:
            raise DataError(f"vqav2: no question/annotation files in {root}.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
        return gens

    def _find_image(self, root: str, sub: str, image_id: int) -> str | None:
        for name in (f"COCO_{sub}_{image_id:012d}.jpg", f"{image_id}.jpg"):
            p = os.path.join(root, sub, name)
            if os.path.isfile(p):
                return p
        return None

    def _generate_examples(self, root: str, split: str, sub: str, questions: list, annotations: list):
        counts = collections.Counter()
        by_qid = {}
        for a in annotations:
            try:
                by_qid[int(a["question_id"])] = a
            except (KeyError, TypeError, ValueError):
                counts["bad_annotations"] += 1
        per_image = collections.defaultdict(list)
        seen = set()
        for q in questions:
            try:
                qid, image_id, text = int(q["question_id"]), int(q["image_id"]), str(q["question"]).strip()
            except (KeyError, TypeError, ValueError):
                counts["bad_questions"] += 1
                continue
            a = by_qid.get(qid)
            if a is None:
                counts["questions_without_annotation"] += 1
                continue
            seen.add(qid)
            answers = [" ".join(str(x.get("answer", "")).split()) for x in a.get("answers", []) if isinstance(x, dict)]
            answers = [x for x in answers if x]
            if not text or not answers:
                counts["questions_without_answers"] += 1
                continue
            per_image[image_id].append(dict(
                question=text, answer=str(a.get("multiple_choice_answer") or answers[0]).strip(),
                qtype=str(a.get("question_type", "")), question_id=qid, answers="\n".join(answers),
                answer_type=str(a.get("answer_type", ""))))
        counts["annotations_without_question"] = len(set(by_qid) - seen)
        for image_id in sorted(per_image):
            path = self._find_image(root, sub, image_id)
            if path is None:
                counts["missing_images"] += 1
                counts["questions_of_missing_images"] += len(per_image[image_id])
                continue
            image = load_image_jpeg(path, self.builder_config.max_side)
            if image is None:
                counts["corrupt_images"] += 1
                counts["questions_of_missing_images"] += len(per_image[image_id])
                continue
            qs = sorted(per_image[image_id], key=lambda d: d["question_id"])
            counts["images"] += 1
            counts["questions"] += len(qs)
            yield image_id, {"image": image, "image_id": image_id, "captions": [], "objects": [],
                             "questions": qs}
        keys = ("images", "questions", "missing_images", "corrupt_images", "questions_of_missing_images",
                "questions_without_annotation", "annotations_without_question", "questions_without_answers",
                "bad_questions", "bad_annotations")
        self.skipped[split] = report_counts(f"vqav2 {split}", counts, keys, written=2, logger=log)

