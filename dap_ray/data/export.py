"""From mined Parquet boxes to a COCO detection dataset, and to a contact sheet for people.

No Ray: reads ``boxes/*.parquet`` as :mod:`dap_ray.localisation.stages` writes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq

__all__ = ["ContactSheetConfig", "best_iou", "boxes_to_coco", "contact_sheet", "count_boxes", "pick_rows", "read_boxes",
           "read_boxes_of", "read_run_config", "sample_images", "write_contact_sheet"]


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


# BGR, as OpenCV draws: the top pseudo box, the other pseudo boxes, the true boxes.
TOP_BOX, OTHER_BOX, TRUE_BOX = (255, 255, 255), (0, 255, 255), (0, 220, 0)


def best_iou(boxes: np.ndarray, truth: np.ndarray) -> float:
    """The highest IoU any of ``boxes`` (N, 4) reaches with any of ``truth`` (M, 4), xyxy pixels;
    0 when either is empty."""
    from dap_ray.evaluation.localisation import box_iou

    if len(boxes) == 0 or len(truth) == 0:
        return 0.0
    return float(box_iou(boxes, truth).max())


def pick_rows(rows: list[dict], num: int, order: str = "file", seed: int = 0, ids=(),
              truth: dict[str, np.ndarray] | None = None) -> list[dict]:
    """Which mined rows a contact sheet shows: ``ids`` when given (in that order; an id not
    mined is an error naming it), else ``num`` rows spread over the run in id order
    (``file``), drawn with ``seed`` (``random``), or those whose best IoU against ``truth`` is
    lowest first (``worst``; rows of images without true boxes are left out)."""
    if ids:
        by_id = {r["image_id"]: r for r in rows}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"--ids not in the mining run: {missing[:5]}")
        return [by_id[i] for i in ids]
    if order == "worst":
        if truth is None:
            raise ValueError("--order worst needs --gt-boxes (the true boxes to rank the images by)")
        ranked = [r for r in rows if r["image_id"] in truth]
        if not ranked:
            raise ValueError("none of the mined images has a true box in --gt-boxes (their file_names are the ids)")
        return sorted(ranked, key=lambda r: (best_iou(r["boxes"], truth[r["image_id"]]), r["image_id"]))[:num]
    if order == "random":
        picked = np.random.default_rng(seed).permutation(len(rows))[:num]
        return [rows[i] for i in sorted(picked)]
    if order != "file":
        raise ValueError(f"order must be file, random or worst, got {order!r}")
    step = max(1, len(rows) // max(1, num))
    return rows[::step][:num]


def contact_sheet(rows: list[dict], images: list[np.ndarray], cams: list[np.ndarray] | None = None,
                  cam_scale: int = 576, tile: int = 256, columns: int = 4,
                  truth: dict[str, np.ndarray] | None = None, class_names: list[str] | None = None) -> np.ndarray:
    """A grid of images (RGB uint8) with their CAM (on the ``cam_scale`` stride-32 grid) as a
    heat map and their pseudo boxes drawn, the top-scored one in white, the others yellow, each
    with its score (the paper's Figure 6); with ``truth`` (image id to (M, 4) xyxy pixels) the
    true boxes in green and the image's best IoU against them. Each tile is captioned with the
    class name (``class_names[label]``, else the label), the box count and that IoU; a legend
    heads the sheet. Returns RGB uint8."""
    import cv2

    font = cv2.FONT_HERSHEY_SIMPLEX
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
        factor = (tile - 18) / max(canvas.shape[:2])
        canvas = cv2.resize(canvas, (max(1, int(canvas.shape[1] * factor)), max(1, int(canvas.shape[0] * factor))))
        true_boxes = None if truth is None else truth.get(row["image_id"], np.zeros((0, 4), np.float32))
        for box in ([] if true_boxes is None else true_boxes):
            x1, y1, x2, y2 = (int(round(v * factor)) for v in box)
            cv2.rectangle(canvas, (x1, y1), (x2, y2), TRUE_BOX, 2)
        scores = row.get("scores", np.ones(len(row["boxes"]), np.float32))
        for i in reversed(range(len(row["boxes"]))):  # the top box drawn last, on top
            x1, y1, x2, y2 = (int(round(v * factor)) for v in row["boxes"][i])
            colour = TOP_BOX if i == 0 else OTHER_BOX
            cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, 2 if i == 0 else 1)
            cv2.putText(canvas, f"{float(scores[i]):.2f}", (x1 + 2, max(10, y1 + 11)), font, 0.35, colour, 1,
                        cv2.LINE_AA)
        framed = np.zeros((tile, tile, 3), np.uint8)
        framed[: canvas.shape[0], : canvas.shape[1]] = canvas
        label = row.get("label", -1)
        name = class_names[label] if class_names and 0 <= label < len(class_names) else str(label)
        caption = f"{name}, {len(row['boxes'])} box{'es' if len(row['boxes']) != 1 else ''}"
        if true_boxes is not None:
            caption += f", best IoU {best_iou(row['boxes'], true_boxes):.2f}" if len(true_boxes) else ", no true box"
        cv2.putText(framed, caption, (3, tile - 5), font, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(framed)
    while len(tiles) % columns:
        tiles.append(np.zeros((tile, tile, 3), np.uint8))
    grid = np.vstack([np.hstack(tiles[r : r + columns]) for r in range(0, len(tiles), columns)])
    return np.vstack([_legend(grid.shape[1], truth is not None, cams is not None), grid])[:, :, ::-1]


def _legend(width: int, with_truth: bool, with_cam: bool) -> np.ndarray:
    """A 22-pixel strip naming the colours (BGR)."""
    import cv2

    strip = np.full((22, width, 3), 40, np.uint8)
    entries = [(TOP_BOX, "top pseudo box"), (OTHER_BOX, "other pseudo boxes (score by each)")]
    if with_truth:
        entries.append((TRUE_BOX, "true boxes"))
    x = 6
    for colour, text in entries:
        cv2.rectangle(strip, (x, 6), (x + 14, 16), colour, 2)
        cv2.putText(strip, text, (x + 20, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        x += 28 + 7 * len(text)
    if with_cam:
        cv2.putText(strip, "heat: CAM of the label", (x, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return strip


@dataclass(frozen=True)
class ContactSheetConfig:
    """What ``jobs/visualize.py`` draws."""

    boxes: str | None = field(default=None, metadata={"help": "the boxes/ folder a mining run wrote (required)"})
    output: str | None = field(default=None, metadata={"help": "PNG to write (required)"})
    input: str | None = field(default=None, metadata={"help": "where the images are (default: the mining run's input)"})
    num: int = field(default=16, metadata={"help": "images to show"})
    gt_boxes: str | None = field(default=None, metadata={
        "help": "COCO file of true boxes (file_name = image id): drawn in green, each image's best IoU shown"})
    order: Literal["file", "random", "worst"] = field(default="file", metadata={
        "help": "file: spread over the run in id order; random: drawn with --seed; worst: lowest best IoU against "
                "--gt-boxes first"})
    seed: int = field(default=0, metadata={"help": "the draw of --order random"})
    ids: tuple[str, ...] = field(default=(), metadata={"help": "these image ids, in this order (overrides --order)"})
    cam: bool = field(default=True, metadata={"help": "draw the CAM heat map (needs the run's classifier)"})
    columns: int = field(default=4, metadata={"help": "tiles per row"})

    def __post_init__(self) -> None:
        if self.num < 1 or self.columns < 1:
            raise ValueError(f"num and columns must be at least 1, got {self.num}, {self.columns}")


def write_contact_sheet(cfg: ContactSheetConfig) -> Path:
    """Draw the sheet ``cfg`` asks for and write it as a PNG (with ``config.yaml`` beside it as
    ``<output>.yaml``); return its path."""
    import cv2

    from dap_ray.config import save_config
    from dap_ray.data.images import read_class_map
    from dap_ray.evaluation.localisation import load_coco_boxes

    if not cfg.boxes or not cfg.output:
        raise ValueError("give --boxes (a mining run's boxes/ folder) and --output (the PNG to write)")
    config = read_run_config(cfg.boxes)
    if cfg.input:
        config["input"] = cfg.input
    truth = None
    if cfg.gt_boxes:
        if not Path(cfg.gt_boxes).is_file():
            raise ValueError(f"--gt-boxes not found: {cfg.gt_boxes}")
        truth, _ = load_coco_boxes(cfg.gt_boxes)
    rows = pick_rows(read_boxes(cfg.boxes), cfg.num, cfg.order, cfg.seed, cfg.ids, truth)
    images = sample_images(config, {r["image_id"] for r in rows})
    rows = [r for r in rows if r["image_id"] in images]
    if not rows:
        raise ValueError(f"none of the chosen images were found under {config['input']}")
    pictures = [images[r["image_id"]] for r in rows]
    cams = None
    if cfg.cam:
        from dap_ray.localisation.cam import CamExtractor
        from dap_ray.models.classifiers import load_classifier

        model = load_classifier(config["classifier"], config.get("weights"), num_classes=config.get("num_classes"))
        cams = CamExtractor(model, scales=config["scales"], flip=config["flip"])(pictures, [r["label"] for r in rows])
    classes_file = Path(cfg.boxes).parent / "classes.txt"
    names = read_class_map(classes_file) if classes_file.is_file() else (
        read_class_map(config["class_map"]) if config.get("class_map") else None)
    sheet = contact_sheet(rows, pictures, cams, cam_scale=max(config["scales"]) if cams is not None else 576,
                          columns=cfg.columns, truth=truth, class_names=names)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(output), sheet[:, :, ::-1])
    save_config(cfg, output.with_suffix(".yaml"))
    print(f"wrote {len(rows)} images to {output}", flush=True)
    return output
