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


def pseudo_run_as(fmt, root, boxes_dir, images, class_map):
    """A folder pseudo run (``write_pseudo_run``'s) with its images moved into another input format,
    ids as read_shard names them: ``tar`` (a tar per class, members named ``./NAME`` in the
    first), ``webdataset`` (one shard of ``KEY.jpg`` + ``KEY.cls``), ``parquet`` (one file of
    image bytes and labels, row groups of 5). Returns (boxes folder, input, format to read it as).
    """
    import io
    import tarfile
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    root, images = Path(root), Path(images)
    rows = pq.read_table(Path(boxes_dir) / "part-0.parquet").to_pylist()
    datas = [(images / row["image_id"]).read_bytes() for row in rows]
    source = root / fmt
    source.mkdir(parents=True, exist_ok=True)

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    if fmt == "tar":
        paths = [row["image_id"].split("/") for row in rows]
        for k, folder in enumerate(sorted({folder for folder, _ in paths})):
            with tarfile.open(source / f"{folder}.tar", "w") as tar:
                for row, data, (owner, name) in zip(rows, datas, paths):
                    if owner == folder:
                        add(tar, f"./{name}" if k == 0 else name, data)
                        row["image_id"] = f"{folder}.tar::{'./' if k == 0 else ''}{name}"
    elif fmt == "webdataset":
        with tarfile.open(source / "shard-000.tar", "w") as tar:
            for k, (row, data) in enumerate(zip(rows, datas)):
                add(tar, f"{k:05d}.jpg", data)
                add(tar, f"{k:05d}.cls", str(row["label"]).encode())
                row["image_id"] = f"shard-000.tar::{k:05d}.jpg"
    else:
        pq.write_table(pa.table({"image": pa.array(datas, pa.binary()), "label": [row["label"] for row in rows]}),
                       source / "images.parquet", row_group_size=5)
        for k, row in enumerate(rows):
            row["image_id"] = f"images.parquet::{k}"
    read_as = "tar" if fmt == "webdataset" else fmt
    return write_pseudo_run(root / f"{fmt}_run", rows, source, read_as, class_map), source, read_as
