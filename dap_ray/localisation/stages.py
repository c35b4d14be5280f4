"""The stages of Step 2 as plain functions and callable classes over pyarrow batches.

:mod:`dap_ray.steps.mine` strings them together on Ray Data; here they import no Ray and are
tested directly. Images cross stages as encoded or raw bytes plus their shapes, never as
ragged tensor columns.

Output rows (``boxes/*.parquet``): ``image_id`` string, ``label`` int32, ``width`` and
``height`` int32 (original image, after its EXIF orientation), ``boxes`` list of 4-float
lists (xyxy, original-image pixels), ``scores`` list of floats. Error rows
(``errors/*.parquet``): ``image_id``, ``label``, ``error`` (a readable reason), ``retry``
(the failure may pass, such as an I/O error: a rerun tries the image again).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dap_ray.data.images import MAX_IMAGE_PIXELS, BadImageError, decode_image
from dap_ray.localisation.boxes import BoxConfig, cam_to_boxes_batch

# Smaller images hold nothing a stride-32 CAM can localise.
MIN_IMAGE_SIDE = 8

__all__ = ["BOXES_SCHEMA", "ERRORS_SCHEMA", "MIN_IMAGE_SIDE", "CamBoxStage", "decode_and_resize",
           "drop_retryable_errors", "read_done_ids", "write_results"]

BOXES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("label", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))), ("scores", pa.list_(pa.float32())),
])
ERRORS_SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int32()), ("error", pa.string()),
                           ("retry", pa.bool_())])



def decode_and_resize(batch: pa.Table, scales: tuple[int, ...], max_pixels: int = MAX_IMAGE_PIXELS) -> pa.Table:
    """Records from :func:`dap_ray.data.sources.read_shard` to decoded images resized to each scale.

    Output columns: ``image_id``, ``label``, ``width``, ``height``, ``error``, and per scale j
    ``pixels{j}`` (raw (h, w, 3) uint8 bytes), ``h{j}``, ``w{j}``. Unreadable images keep
    their row with an ``error`` and no pixels.
    """
    # Imported here: torch costs the job's driver, which never decodes, 3 s of start-up.
    from dap_ray.localisation.cam import resize_short_side

    rows = batch.to_pydict()
    out: dict[str, list] = {k: [] for k in ("image_id", "label", "width", "height", "error", "retry")}
    for j in range(len(scales)):
        out.update({f"pixels{j}": [], f"h{j}": [], f"w{j}": []})
    retries = rows.get("retry") or [False] * len(rows["image_id"])
    for image_id, label, data, error, retry in zip(rows["image_id"], rows["label"], rows["data"], rows["error"],
                                                   retries):
        image = None
        if not error:
            try:
                image = decode_image(data, max_pixels)
            except BadImageError as exc:
                error = str(exc)
        if not error and min(image.shape[:2]) < MIN_IMAGE_SIDE:
            error = f"image of {image.shape[1]}x{image.shape[0]} pixels is too small (under {MIN_IMAGE_SIDE} pixels a side)"
        if not error and label < 0:
            error = "no label"
        out["image_id"].append(image_id)
        out["label"].append(label)
        out["error"].append(error)
        out["retry"].append(bool(retry and error))
        out["height"].append(image.shape[0] if image is not None else 0)
        out["width"].append(image.shape[1] if image is not None else 0)
        for j, scale in enumerate(scales):
            resized = resize_short_side(image, scale) if image is not None and not error else None
            out[f"pixels{j}"].append(resized.tobytes() if resized is not None else b"")
            out[f"h{j}"].append(resized.shape[0] if resized is not None else 0)
            out[f"w{j}"].append(resized.shape[1] if resized is not None else 0)
    return pa.table(out)


class CamBoxStage:
    """Model-holding stage: loads the classifier once, then CAMs and boxes for each batch.

    Called with :func:`decode_and_resize` output, returns ``image_id``, ``label``, ``width``,
    ``height``, ``boxes``, ``scores``, ``error``. An image whose CAM is constant, or a label
    outside the classifier, becomes an error row.
    """

    def __init__(self, classifier: str, weights: str | None, num_classes: int | None, scales: tuple[int, ...],
                 flip: bool, box_config: BoxConfig, batch_size: int, device: str | None = None,
                 torch_threads: int | None = None):
        import torch

        from dap_ray.localisation.cam import CamExtractor
        from dap_ray.models.classifiers import load_classifier

        if torch_threads:
            torch.set_num_threads(torch_threads)
        model = load_classifier(classifier, weights, num_classes=num_classes)
        self.extractor = CamExtractor(model, scales=scales, flip=flip, device=device, batch_size=batch_size)
        self.box_config = box_config

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pydict()
        n = len(rows["image_id"])
        scales = len(self.extractor.scales)
        errors = list(rows["error"])
        for i in range(n):
            if not errors[i] and not 0 <= rows["label"][i] < self.extractor.num_classes:
                errors[i] = f"label {rows['label'][i]} is outside the classifier's {self.extractor.num_classes} classes"
        good = [i for i in range(n) if not errors[i]]
        resized = [
            [np.frombuffer(rows[f"pixels{j}"][i], np.uint8).reshape(rows[f"h{j}"][i], rows[f"w{j}"][i], 3).copy()
             for j in range(scales)]
            for i in good
        ]
        cams = self.extractor.from_resized(resized, [rows["label"][i] for i in good]) if good else []
        sizes = [(rows["width"][i], rows["height"][i]) for i in good]
        boxes: list = [[] for _ in range(n)]
        scores: list = [[] for _ in range(n)]
        for i, cam, (b, s) in zip(good, cams, cam_to_boxes_batch(cams, sizes, self.box_config)):
            if not cam.any():
                errors[i] = "constant class activation map: nothing to localise"
                continue
            boxes[i], scores[i] = b.tolist(), s.tolist()
        return pa.table({
            "image_id": rows["image_id"], "label": rows["label"], "width": rows["width"], "height": rows["height"],
            "boxes": boxes, "scores": scores, "error": errors,
            "retry": [bool(r and e) for r, e in zip(rows.get("retry") or [False] * n, errors)],
        })


def write_results(batch: pa.Table, output: str) -> pa.Table:
    """Write a batch's rows to ``output/boxes`` and ``output/errors`` and return its counts.

    File names come from the batch's image ids, and each file appears whole (written to a
    temporary name, then renamed), so a retried task rewrites the same file and a killed
    run leaves no partial file: every image is in exactly one file.
    """
    rows = batch.to_pydict()
    ok = [i for i, e in enumerate(rows["error"]) if not e]
    bad = [i for i, e in enumerate(rows["error"]) if e]
    digest = hashlib.sha1("\n".join(rows["image_id"]).encode()).hexdigest()[:20]
    if ok:
        table = pa.table({
            "image_id": [rows["image_id"][i] for i in ok], "label": [rows["label"][i] for i in ok],
            "width": [rows["width"][i] for i in ok], "height": [rows["height"][i] for i in ok],
            "boxes": [rows["boxes"][i] for i in ok], "scores": [rows["scores"][i] for i in ok],
        }, schema=BOXES_SCHEMA)
        _write_atomic(table, Path(output) / "boxes" / f"part-{digest}.parquet")
    if bad:
        retry = rows.get("retry") or [False] * len(rows["image_id"])
        table = pa.table({"image_id": [rows["image_id"][i] for i in bad], "label": [rows["label"][i] for i in bad],
                          "error": [rows["error"][i] for i in bad], "retry": [bool(retry[i]) for i in bad]},
                         schema=ERRORS_SCHEMA)
        _write_atomic(table, Path(output) / "errors" / f"part-{digest}.parquet")
    return pa.table({"images": [len(ok)], "errors": [len(bad)], "boxes": [sum(len(rows["boxes"][i]) for i in ok)]})


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    pq.write_table(table, partial)
    os.replace(partial, path)


def drop_retryable_errors(output: str | Path) -> int:
    """Remove from ``output/errors`` the rows whose failure may pass (``retry``), so that a rerun
    tries those images again; return how many. Each file is rewritten whole (or removed).

    A rerun killed after this leaves those images not done, so they are still mined later:
    nothing is lost. Files from before the ``retry`` column count as lasting failures.
    """
    dropped = 0
    for path in sorted((Path(output) / "errors").glob("part-*.parquet")):
        table = pq.read_table(path)
        if "retry" not in table.column_names:
            continue
        keep = [not r for r in table.column("retry").to_pylist()]
        if all(keep):
            continue
        dropped += keep.count(False)
        if any(keep):
            _write_atomic(table.filter(pa.array(keep)), path)
        else:
            path.unlink()
    return dropped


def read_done_ids(output: str | Path) -> frozenset[str]:
    """Image ids already written under ``output`` (for resuming)."""
    done: set[str] = set()
    for sub in ("boxes", "errors"):
        for path in sorted((Path(output) / sub).glob("part-*.parquet")):
            done.update(pq.read_table(path, columns=["image_id"]).column(0).to_pylist())
    return frozenset(done)
