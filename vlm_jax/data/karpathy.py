"""Karpathy-split caption datasets (COCO, Flickr8k, Flickr30k) from local files.

Legend of dimension letters: H, W image height/width (pixels), M max image side.

Reads the split JSON of Karpathy & Fei-Fei (2015) from `manual_dir` plus the image files,
and writes the caption features of docs/interfaces.md (objects/questions empty). Split
'restval' goes to train. Images that are missing or cannot be decoded, and empty captions,
are skipped and counted; one log line per split reports the counts (also kept in
`builder.skipped[split]`). Images larger than `max_side` are downscaled (aspect kept) and
stored as JPEG to keep records small.
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

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put the Karpathy split JSON and the images into `manual_dir`
(config.data.manual_dir, or download_config=tfds.download.DownloadConfig(manual_dir=...)):

  manual_dir/
    dataset_coco.json | dataset_flickr8k.json | dataset_flickr30k.json
    <images>

The JSONs are in http://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip.
Images: COCO 2014 train/val (https://cocodataset.org, folders train2014/ and val2014/),
Flickr8k (Flickr8k_Dataset.zip) or Flickr30k (flickr30k-images). An image entry
{"filepath": FP, "filename": FN} is looked up at, in this order:
  manual_dir/FP/FN, manual_dir/images/FP/FN, manual_dir/<image_dir>/FN,
  manual_dir/images/FN, manual_dir/FN
where <image_dir> is the config's usual folder name ('Flicker8k_Dataset' for flickr8k,
'flickr30k-images' for flickr30k, '' for coco). Symlinks are fine.
"""


@dataclasses.dataclass(eq=False)
class KarpathyConfig(tfds.core.BuilderConfig):
    json_name: str = ""
    image_dir: str = ""          # conventional image folder inside manual_dir
    max_side: int = 512          # images with a longer side are downscaled; 0 = keep size


class KarpathyCaptions(PackageBuilderMixin, tfds.core.GeneratorBasedBuilder):
    """COCO / Flickr8k / Flickr30k captions with the Karpathy train/val/test split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [
        KarpathyConfig(name="coco", description="MS-COCO 2014, Karpathy split (restval -> train)",
                       json_name="dataset_coco.json"),
        KarpathyConfig(name="flickr8k", description="Flickr8k, Karpathy split",
                       json_name="dataset_flickr8k.json", image_dir="Flicker8k_Dataset"),
        KarpathyConfig(name="flickr30k", description="Flickr30k, Karpathy split",
                       json_name="dataset_flickr30k.json", image_dir="flickr30k-images"),
    ]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.skipped: dict[str, dict[str, int]] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=caption_features((None, None, 3), "jpeg"),
            homepage="https://cs.stanford.edu/people/karpathy/deepimagesent/",
            disable_shuffling=True,  # records stored in image_id order
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        path = os.path.join(root, self.builder_config.json_name)
        from vlm_jax.errors import DataError
        if not os.path.exists(path):
            raise DataError(
                f"karpathy_captions/{self.builder_config.name}: {path} not found.\n"
                + MANUAL_DOWNLOAD_INSTRUCTIONS)
        try:
            with open(path) as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e}); re-download the Karpathy split file "
                            f"{self.builder_config.json_name} into --config.data.manual_dir.") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(f"{path}: expected a JSON object with an 'images' list "
                            "(Karpathy split format).")
        by_split = collections.defaultdict(list)
        for entry in data["images"]:
            split = entry.get("split")
            split = "train" if split == "restval" else split
            if split not in ("train", "val", "test"):
                raise ValueError(f"{path}: image {entry.get('filename')!r} has split "
                                 f"{entry.get('split')!r}; expected train|val|test|restval.")
            by_split[split].append(entry)
        return {s: self._generate_examples(root, s, by_split[s]) for s in ("train", "val", "test")}

    # ---------------------------------------------------------------- helpers
    def _find_image(self, root: str, entry: dict) -> str | None:
        fn, fp = entry["filename"], entry.get("filepath", "")
        candidates = [os.path.join(root, fp, fn), os.path.join(root, "images", fp, fn)]
        if self.builder_config.image_dir:
            candidates.append(os.path.join(root, self.builder_config.image_dir, fn))
        candidates += [os.path.join(root, "images", fn), os.path.join(root, fn)]
        return next((c for c in candidates if os.path.isfile(c)), None)

    def _generate_examples(self, root: str, split: str, entries: list[dict]):
        counts = collections.Counter()
        for entry in entries:
            image_id = entry.get("cocoid", entry.get("imgid"))
            if image_id is None:
                raise ValueError(f"{self.builder_config.json_name}: image "
                                 f"{entry.get('filename')!r} has neither 'cocoid' nor 'imgid'.")
            captions = []
            for sent in entry.get("sentences", []):
                raw = sent.get("raw")
                text = (raw if raw is not None else " ".join(sent.get("tokens", []))).strip()
                if text:
                    captions.append(text)
                else:
                    counts["empty_captions"] += 1
            if not captions:
                counts["images_without_captions"] += 1
                continue
            path = self._find_image(root, entry)
            if path is None:
                counts["missing_images"] += 1
                continue
            image = load_image_jpeg(path, self.builder_config.max_side)
            if image is None:
                counts["corrupt_images"] += 1
                continue
            counts["images"] += 1
            counts["captions"] += len(captions)
            yield int(image_id), {
                "image": image,
                "image_id": int(image_id),
                "captions": captions,
                "objects": [],
                "questions": [],
            }
        keys = ("images", "captions", "missing_images", "corrupt_images", "empty_captions",
                "images_without_captions")
        self.skipped[split] = report_counts(f"karpathy_captions/{self.builder_config.name} {split}", counts, keys,
                                            written=2, logger=log)
