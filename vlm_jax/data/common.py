"""Pieces shared by the caption dataset builders and the input pipeline.

Legend of dimension letters: H, W image height/width (pixels), S output side, C channels (3).
"""
from __future__ import annotations

import inspect
import io
import logging

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image


def caption_features(image_shape=(None, None, 3), encoding_format: str = "png", *, vqa_answers: bool = False):
    """The FeaturesDict shared by every caption dataset (docs/interfaces.md "Data").

    image [H, W, 3] uint8 (PNG/JPEG encoded on disk), image_id int64, captions: list of text,
    objects: list of {shape, color, size, bbox f32[4] = [ymin, xmin, ymax, xmax] in [0, 1]},
    questions: list of {question, answer, qtype} and, with ``vqa_answers`` (VQAv2), also
    {question_id int64, answers: the human answers joined by newlines (TFDS serialises a list of
    texts inside a sequence only through TensorFlow), answer_type}.
    """
    question = {"question": tfds.features.Text(), "answer": tfds.features.Text(), "qtype": tfds.features.Text()}
    if vqa_answers:
        question.update(question_id=np.int64, answers=tfds.features.Text(), answer_type=tfds.features.Text())
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=image_shape, encoding_format=encoding_format),
        "image_id": np.int64,
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "objects": tfds.features.Sequence({
            "shape": tfds.features.Text(),
            "color": tfds.features.Text(),
            "size": tfds.features.Text(),
            "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        }),
        "questions": tfds.features.Sequence(question),
    })


class PackageBuilderMixin:
    """Lets a `GeneratorBasedBuilder` live inside the vlm_jax package without TensorFlow.

    TFDS' default `code_path` for builders defined in a package consults
    `importlib_resources`, which is not part of the JAX stack and raises
    ModuleNotFoundError during `download_and_prepare`. The builder's source file is all TFDS
    needs it for (locating an optional checksums file), so return it directly.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # pytype: disable=signature-mismatch
        return epath.Path(inspect.getfile(cls))


def load_image_jpeg(path: str, max_side: int) -> bytes | None:
    """JPEG bytes of the RGB image at ``path`` (downscaled so its longer side is at most
    ``max_side``; 0 = keep), the file's own bytes when it already is such a JPEG; None when the
    file cannot be read or decoded (the builders count it as a skipped image)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as im:
            im.load()  # full decode: catches truncated / corrupt files
            if im.format == "JPEG" and im.mode == "RGB" and (not max_side or max(im.size) <= max_side):
                return raw  # already what we store: no re-encoding loss
            im = im.convert("RGB")
            if max_side and max(im.size) > max_side:
                scale = max_side / max(im.size)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                               Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=92)
            return buf.getvalue()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None  # PIL reports corrupt files with any of these


def encode_png(img: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (fast compression level)."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 [H, W, 3] (grayscale / RGBA / palette converted to RGB)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def resize_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [S, S, 3]: shorter side to S (bilinear, PIL), centre crop.

    Square inputs are simply resized (or returned unchanged when already S x S).
    """
    h, w = img.shape[:2]
    if h == w == size:
        return img
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    im = Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def report_counts(name: str, counts, keys, *, written: int, extra: str = "",
                  logger: logging.Logger | None = None) -> dict[str, int]:
    """The one end-of-split summary of a dataset builder: {key: count} for `keys` (the first
    `written` of them count what was written, the rest what was skipped), logged as one line,
    a WARNING when anything was skipped, on `logger` (the builder module's). Builders keep the
    dict as `builder.skipped[split]`."""
    out = {k: int(counts[k]) for k in keys}
    level = logging.WARNING if any(out[k] for k in keys[written:]) else logging.INFO
    (logger or logging.getLogger("vlm_jax.data")).log(
        level, "%s: wrote %s; skipped %s%s", name, ", ".join(f"{out[k]} {k.replace('_', ' ')}" for k in keys[:written]),
        ", ".join(f"{out[k]} {k.replace('_', ' ')}" for k in keys[written:]), extra)
    return out
