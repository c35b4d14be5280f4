"""From mined Parquet boxes to a COCO detection dataset, and to a contact sheet for people.

No Ray: reads ``boxes/*.parquet`` as :mod:`dap_ray.localisation.stages` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

__all__ = ["boxes_to_coco", "contact_sheet", "count_boxes", "read_boxes", "read_boxes_of", "read_run_config",
           "sample_images"]


def read_run_config(boxes_dir: str | Path) -> dict:
    """The resolved ``config.yaml`` a mining run wrote beside ``boxes_dir``."""
    import yaml

    saved = Path(boxes_dir).parent / "config.yaml"
    if not saved.is_file():
        raise ValueError(f"{saved} not found: --boxes must be the boxes/ folder of a mining run")
    return yaml.safe_load(saved.read_text())


def sample_images(config: dict, image_ids: set[str]) -> dict[str, np.ndarray]:
    """Decoded images of ``image_ids`` from the input a mining run's ``config.yaml`` names
    (those that cannot be read or decoded are left out)."""
    from dap_ray.data.images import BadImageError, decode_image
    from dap_ray.data.sources import ImageReader

    reader = ImageReader(config["input"], config["format"], image_column=config.get("image_column", "image"))
    found: dict[str, np.ndarray] = {}
    for image_id in sorted(image_ids):
        try:
            found[image_id] = decode_image(reader.read(image_id))
        except (KeyError, OSError, BadImageError):
            continue
    return found


def read_boxes(boxes_dir: str | Path) -> list[dict]:
    """Rows of ``boxes_dir/*.parquet`` sorted by image id, boxes as float32 (N, 4) xyxy arrays."""
    files = sorted(Path(boxes_dir).glob("*.parquet"))
    if not files:
        raise ValueError(f"no Parquet files in {boxes_dir}")
    rows = pq.read_table(files).to_pylist()
    for row in rows:
        row["boxes"] = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
        row["scores"] = np.asarray(row["scores"], np.float32)
    return sorted(rows, key=lambda r: r["image_id"])


def count_boxes(boxes_dir: str | Path) -> tuple[int, int]:
    """(images, boxes) in ``boxes_dir/part-*.parquet``: Arrow column aggregates, file by file and
    batch by batch, so memory stays flat however many images (no Python object per row)."""
    import pyarrow.compute as pc

    images = boxes = 0
    for path in sorted(Path(boxes_dir).glob("part-*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=["scores"]):
            images += batch.num_rows
            boxes += pc.sum(pc.list_value_length(batch.column(0))).as_py() or 0
    return images, boxes


def read_boxes_of(boxes_dir: str | Path, image_ids) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{image_id: (boxes float32 (N, 4) xyxy pixels, scores float32 (N,))}`` for the rows of
    ``boxes_dir/part-*.parquet`` whose id is in ``image_ids`` (say the few with true boxes):
    filtered in Arrow, file by file, so only those rows become Python objects."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(sorted(set(image_ids)), pa.string())
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in sorted(Path(boxes_dir).glob("part-*.parquet")):
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=65536, columns=["image_id", "boxes", "scores"]):
            rows = pa.Table.from_batches([batch]).filter(pc.is_in(batch.column(0), value_set=wanted))
            for row in rows.to_pylist():
                found[row["image_id"]] = (np.asarray(row["boxes"], np.float32).reshape(-1, 4),
                                          np.asarray(row["scores"], np.float32))
    return found


def boxes_to_coco(boxes_dir: str | Path, output: str | Path, classes: list[str] | None = None) -> dict:
    """Write a COCO detection file (``file_name`` = image id, xywh boxes, ``score`` kept,
    ``category_id`` = label + 1 so that 0 stays background) and return it."""
    rows = read_boxes(boxes_dir)
    num_classes = max(len(classes or []), max(r["label"] for r in rows) + 1)
    names = list(classes or []) + [f"class_{k}" for k in range(len(classes or []), num_classes)]
    images, annotations = [], []
    for image_index, row in enumerate(rows, start=1):
        images.append({"id": image_index, "file_name": row["image_id"], "width": row["width"], "height": row["height"]})
        for box, score in zip(row["boxes"], row["scores"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": image_index, "category_id": row["label"] + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0, "score": float(score)})
    coco = {"info": {"description": "DAP pseudo boxes (dap_ray)"}, "images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": name} for k, name in enumerate(names)]}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(coco))
    return coco


def contact_sheet(rows: list[dict], images: list[np.ndarray], cams: list[np.ndarray] | None = None,
                  cam_scale: int = 576, tile: int = 256, columns: int = 4) -> np.ndarray:
    """A grid of images (RGB uint8) with their CAM (on the ``cam_scale`` stride-32 grid) as a
    heat map and their boxes drawn, the top-scored one in white (the paper's Figure 6)."""
    import cv2

    tiles = []
    for k, (row, image) in enumerate(zip(rows, images)):
        canvas = image[:, :, ::-1].copy()
        if cams is not None:
            h, w = image.shape[:2]
            cam = cams[k]
            # One cell spans 32 * min(h, w) / cam_scale pixels; the grid's stride padding is cropped off.
            cell = 32 * min(h, w) / cam_scale
            big = cv2.resize(cam, (max(1, round(cam.shape[1] * cell)), max(1, round(cam.shape[0] * cell))),
                             interpolation=cv2.INTER_NEAREST)
            heat = np.zeros((h, w), np.float32)
            heat[: min(h, big.shape[0]), : min(w, big.shape[1])] = big[:h, :w]
            colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
            canvas = cv2.addWeighted(canvas, 0.55, colour, 0.45, 0)
        thickness = max(1, round(max(image.shape[:2]) / 200))
        for i, box in enumerate(row["boxes"]):
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            cv2.rectangle(canvas, (x1, y1), (x2, y2), (255, 255, 255) if i == 0 else (0, 255, 255), thickness)
        factor = tile / max(canvas.shape[:2])
        canvas = cv2.resize(canvas, (max(1, int(canvas.shape[1] * factor)), max(1, int(canvas.shape[0] * factor))))
        framed = np.zeros((tile, tile, 3), np.uint8)
        framed[: canvas.shape[0], : canvas.shape[1]] = canvas
        tiles.append(framed)
    while len(tiles) % columns:
        tiles.append(np.zeros((tile, tile, 3), np.uint8))
    grid = np.vstack([np.hstack(tiles[r : r + columns]) for r in range(0, len(tiles), columns)])
    return grid[:, :, ::-1]
