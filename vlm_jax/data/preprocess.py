"""Image preprocessing: encoded bytes -> decoded RGB -> resized, centre-cropped, normalised.

Legend of dimension letters: H, W stored image height/width, S model input side.

Steps: decode (PIL) -> RGB -> shorter side to S (bilinear, PIL) + centre crop -> float32 ->
x = (pixel / 255 - mean) / std per channel.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from vlm_jax.data.common import decode_rgb, resize_center_crop


class ImagePreprocessor:
    """Encoded image bytes -> float32 [S, S, 3] normalised (and the uint8 [S, S, 3] view)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.image_size = image_size
        self.mean = np.asarray(mean, np.float32).reshape(1, 1, 3)
        self.std = np.asarray(std, np.float32).reshape(1, 1, 3)

    def uint8(self, data: bytes) -> np.ndarray:
        """uint8 [S, S, 3]: decoded, resized and cropped, not normalised."""
        return resize_center_crop(decode_rgb(data), self.image_size)

    def raw(self, data: bytes) -> np.ndarray:
        """uint8 [H, W, 3]: the stored image, decoded to RGB."""
        return decode_rgb(data)

    def normalise(self, img: np.ndarray) -> np.ndarray:
        return ((img.astype(np.float32) / 255.0 - self.mean) / self.std).astype(np.float32)

    def __call__(self, data: bytes) -> np.ndarray:
        return self.normalise(self.uint8(data))


def preprocessor_for(data) -> ImagePreprocessor:
    """The preprocessor of `config.data` (image_size, mean, std)."""
    return ImagePreprocessor(data.image_size, data.mean, data.std)
