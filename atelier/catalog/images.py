"""Image bytes <-> uint8 arrays (H, W, C), and the square resize every model and embedder uses."""

from __future__ import annotations

import cv2
import numpy as np


class ImageDecodeError(ValueError):
    """The bytes are not an image OpenCV can decode."""


def decode_image(data: bytes, channels: int) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> uint8 (H, W, channels), RGB order for 3 channels."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    image = cv2.imdecode(buffer, flag) if buffer.size else None
    if image is None:
        raise ImageDecodeError(f"undecodable image ({len(data)} bytes)")
    if channels == 1:
        return image[:, :, None]
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, 1|3) -> PNG bytes."""
    image = np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError(f"could not encode an image of shape {image.shape} as PNG")
    return buffer.tobytes()


def to_square(image: np.ndarray, size: int, pad_value: int = 255) -> np.ndarray:
    """Resize to size x size keeping the aspect ratio: scale the long side, pad the short one.

    Product photos sit on white, hence the white default padding.
    """
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (nw, nh), interpolation=interpolation)
    if resized.ndim == 2:
        resized = resized[:, :, None]
    out = np.full((size, size, image.shape[2]), pad_value, dtype=np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = resized
    return out


def image_grid(images: np.ndarray, columns: int, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """(N, H, W, C) uint8 -> one image with `columns` per row, filled row by row."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = image
    return grid
