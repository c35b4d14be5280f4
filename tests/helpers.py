"""Small shared builders for tests."""

import io

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def photo(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 3 + y) % 256, (np.sin(x / 5.0) * 90 + 128), (np.cos(y / 4.0) * 90 + 128)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8))


def bad_files(rng: np.random.Generator) -> dict[str, bytes]:
    """Inputs that must not stop a mining run: name -> bytes; the comment says which ones still mine."""
    rgb = photo(rng, 40, 50)
    return {
        "corrupt.jpg": encode(rgb, "JPEG")[:60],  # error
        "empty.jpg": b"",  # error
        "text.jpg": b"definitely not an image",  # error
        "gray.png": encode(rgb.convert("L")),  # mined
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),  # mined
        "deep.png": encode(Image.fromarray((np.arange(2000, dtype=np.uint16).reshape(40, 50) * 30))),  # mined
        "alpha.png": encode(rgb.convert("RGBA")),  # mined
        "tiny.png": encode(Image.new("RGB", (1, 1), (200, 10, 10))),  # error: too small
    }


BAD_ERRORS = {"corrupt.jpg", "empty.jpg", "text.jpg", "tiny.png"}
