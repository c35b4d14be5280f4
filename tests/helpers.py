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


def exif_rotated_photo(rng: np.random.Generator, height: int, width: int) -> bytes:
    """A JPEG stored as height x width whose EXIF orientation (6) says: turn it 90 degrees to view it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    photo(rng, height, width).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def write_pseudo_run(output, rows, input_path, fmt="folder", class_map=None):
    """A mining run's outputs as pretraining reads them: boxes/part-0.parquet and config.yaml.

    ``rows``: dicts with image_id, label, width, height, boxes ((N, 4) xyxy) and scores (N).
    """
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from dap_ray.localisation.stages import BOXES_SCHEMA

    output = Path(output)
    (output / "boxes").mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "image_id": [r["image_id"] for r in rows], "label": [r["label"] for r in rows],
        "width": [r["width"] for r in rows], "height": [r["height"] for r in rows],
        "boxes": [np.asarray(r["boxes"], np.float32).reshape(-1, 4).tolist() for r in rows],
        "scores": [np.asarray(r["scores"], np.float32).tolist() for r in rows],
    }, schema=BOXES_SCHEMA)
    pq.write_table(table, output / "boxes" / "part-0.parquet")
    (output / "config.yaml").write_text(yaml.safe_dump(
        {"input": str(input_path), "format": fmt, "class_map": str(class_map) if class_map else None}))
    return output / "boxes"
