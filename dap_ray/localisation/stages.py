"""The stages of Step 2 as plain functions and callable classes over pyarrow batches.

:mod:`dap_ray.steps.mine` strings them together on Ray Data; here they import no Ray and are
tested directly. Images cross stages as encoded or raw bytes plus their shapes, never as
ragged tensor columns.

Output rows (``boxes/*.parquet``): ``image_id`` string, ``label`` int32, ``width`` and
``height`` int32 (original image, after its EXIF orientation), ``boxes`` list of 4-float
lists (xyxy, original-image pixels), ``scores`` list of floats. Error rows
(``errors/*.parquet``): ``image_id``, ``label``, ``error`` (a readable reason), ``retry``
(the failure may pass, such as an I/O error: a rerun tries the image again), ``shard``.

Each file is one write of up to ``rows_per_file`` images (tens of thousands: a 14M-image run
writes about a thousand files), appears whole, and records in its Parquet metadata
(``dap_ray.shards``: ``{shard: [rows in this file, records in the whole shard]}``) which
input shards its rows belong to; :func:`read_progress` plans a rerun from those footers alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dap_ray.data.images import MAX_IMAGE_PIXELS, BadImageError, decode_image
from dap_ray.localisation.boxes import BoxConfig, cam_to_boxes_batch

# Images per forward pass on a GPU (each with its mirror) per 16 GiB of its memory: 64 at
# 576 x 768 hold about 5 GB of ResNet-50 activations in bf16, so 16 GB cards take them and an
# 80 GB card a whole batch of 256.
GPU_FORWARD_IMAGES_PER_16_GIB = 64
# Smaller images hold nothing a stride-32 CAM can localise.
MIN_IMAGE_SIDE = 8

__all__ = ["BOXES_SCHEMA", "ERRORS_SCHEMA", "GPU_FORWARD_IMAGES_PER_16_GIB", "MIN_IMAGE_SIDE", "SHARDS_KEY",
           "CamBoxStage", "EncodedCamBoxStage", "Progress", "decode_and_resize", "drop_retryable_errors",
           "gpu_forward_images", "plan_resume", "read_done_ids", "read_progress", "write_results"]

BOXES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("label", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))), ("scores", pa.list_(pa.float32())),
])
ERRORS_SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int32()), ("error", pa.string()),
                           ("retry", pa.bool_()), ("shard", pa.string())])
# Parquet metadata key of each output file's {shard: [rows here, records in the shard]}.
SHARDS_KEY = b"dap_ray.shards"



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
        if not error:
            error = _decoded_image_error(image.shape[1], image.shape[0], label)
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
    out.update(_provenance(rows))
    return pa.table(out)


def _decoded_image_error(width: int, height: int, label: int) -> str:
    """Why a decoded image of ``width`` x ``height`` pixels labelled ``label`` cannot be mined, or ``""``."""
    if min(width, height) < MIN_IMAGE_SIDE:
        return f"image of {width}x{height} pixels is too small (under {MIN_IMAGE_SIDE} pixels a side)"
    return "no label" if label < 0 else ""


def _provenance(rows: dict) -> dict:
    """The columns that tie rows to their input shard, passed on by every stage when present."""
    return {key: rows[key] for key in ("shard", "shard_total") if key in rows}


def gpu_forward_images(device: str | None, batch_size: int, gpu_share: float = 1.0) -> int:
    """Images per forward pass for a model actor on ``device``: ``batch_size`` on a CPU; on a GPU
    :data:`GPU_FORWARD_IMAGES_PER_16_GIB` per 16 GiB of its memory times the share of the GPU
    the actor holds (``--num-gpus-per-actor``, at most 1), at most ``batch_size``."""
    import torch

    if device is None or not str(device).startswith("cuda") or not torch.cuda.is_available():
        return batch_size
    memory = torch.cuda.get_device_properties(torch.device(device)).total_memory * min(1.0, gpu_share)
    return max(1, min(batch_size, int(memory / 2**30 / 16 * GPU_FORWARD_IMAGES_PER_16_GIB)))


class CamBoxStage:
    """Model-holding stage: loads the classifier once, then CAMs and boxes for each batch.

    Called with :func:`decode_and_resize` output, returns ``image_id``, ``label``, ``width``,
    ``height``, ``boxes``, ``scores``, ``error``. An image whose CAM is constant, or a label
    outside the classifier, becomes an error row.
    """

    def __init__(self, classifier: str, weights: str | None, num_classes: int | None, scales: tuple[int, ...],
                 flip: bool, box_config: BoxConfig, batch_size: int, device: str | None = None,
                 torch_threads: int | None = None, compile: bool | str = False, shapes: str = "exact",
                 forward_images: int | None = None, cudnn_benchmark: bool = False, gpu_share: float = 1.0):
        import torch

        from dap_ray.localisation.cam import CamExtractor
        from dap_ray.models.classifiers import load_classifier

        if torch_threads:
            torch.set_num_threads(torch_threads)
        model = load_classifier(classifier, weights, num_classes=num_classes)
        self.extractor = CamExtractor(model, scales=scales, flip=flip, device=device,
                                      batch_size=forward_images or gpu_forward_images(device, batch_size, gpu_share),
                                      shapes=shapes, compile=compile, cudnn_benchmark=cudnn_benchmark)
        if self.extractor.compile_note:
            print(f"warning: {self.extractor.compile_note}", flush=True)
        self.box_config = box_config

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        rows = batch.to_pydict()
        errors = self._label_errors(rows, list(rows["error"]))
        good = [i for i in range(len(errors)) if not errors[i]]
        resized = [
            [torch.from_numpy(np.frombuffer(rows[f"pixels{j}"][i], np.uint8).reshape(rows[f"h{j}"][i],
                                                                                    rows[f"w{j}"][i], 3).copy())
             .permute(2, 0, 1) for j in range(len(self.extractor.scales))]
            for i in good
        ]
        return self._boxes(rows, errors, good, resized)

    def _label_errors(self, rows: dict, errors: list[str]) -> list[str]:
        """``errors`` with an error for each image whose label is outside the classifier."""
        classes = self.extractor.num_classes
        for i, label in enumerate(rows["label"]):
            if not errors[i] and not 0 <= label < classes:
                errors[i] = f"label {label} is outside the classifier's {classes} classes"
        return errors

    def _boxes(self, rows: dict, errors: list[str], good: list[int], resized: list) -> pa.Table:
        """Output rows for a batch whose images ``good`` (no error) are ``resized``:
        ``resized[k][j]``, image ``good[k]`` at scale j, a (3, h, w) uint8 tensor."""
        n = len(errors)
        cams, frames = self.extractor.from_tensors_native(resized, [rows["label"][i] for i in good])
        sizes = [(rows["width"][i], rows["height"][i]) for i in good]
        boxes: list = [[] for _ in range(n)]
        scores: list = [[] for _ in range(n)]
        for i, cam, (b, s) in zip(good, cams, cam_to_boxes_batch(cams, sizes, self.box_config, frames)):
            if not cam.any():
                errors[i] = "constant class activation map: nothing to localise"
                continue
            boxes[i], scores[i] = b.tolist(), s.tolist()
        return pa.table({
            "image_id": rows["image_id"], "label": rows["label"], "width": rows["width"], "height": rows["height"],
            "boxes": boxes, "scores": scores, "error": errors,
            "retry": [bool(r and e) for r, e in zip(rows.get("retry") or [False] * n, errors)],
            **_provenance(rows),
        })


class EncodedCamBoxStage(CamBoxStage):
    """:class:`CamBoxStage` fed encoded images (:func:`dap_ray.data.sources.read_shard`
    records): decodes (:func:`dap_ray.data.device_decode.decode_on_device`; on CUDA, JPEGs
    in batches with nvJPEG) and resizes to each scale on the model's device, so that only the
    encoded bytes cross the object store and the node's CPUs do not decode.

    Errors are those of :func:`decode_and_resize` then :class:`CamBoxStage`, worded alike.
    Arguments as :class:`CamBoxStage`, plus ``max_pixels``.
    """

    def __init__(self, *args, max_pixels: int = MAX_IMAGE_PIXELS, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_pixels = max_pixels

    def __call__(self, batch: pa.Table) -> pa.Table:
        from dap_ray.data.device_decode import decode_on_device
        from dap_ray.localisation.cam import resize_tensor

        rows = batch.to_pydict()
        n = len(rows["image_id"])
        errors = list(rows["error"])
        readable = [i for i in range(n) if not errors[i]]
        images, faults, _ = decode_on_device([rows["data"][i] for i in readable], self.extractor.device,
                                             self.max_pixels)
        decoded = dict(zip(readable, images))
        widths, heights = [0] * n, [0] * n
        for i, image, fault in zip(readable, images, faults):
            if fault:
                errors[i] = fault
                continue
            heights[i], widths[i] = int(image.shape[1]), int(image.shape[2])
            errors[i] = _decoded_image_error(widths[i], heights[i], rows["label"][i])
        # As decode_and_resize: a retry mark lasts only on a row whose reading or decoding failed.
        retries = [bool(r and e) for r, e in zip(rows.get("retry") or [False] * n, errors)]
        rows = {**{k: v for k, v in rows.items() if k != "data"}, "width": widths, "height": heights,
                "retry": retries}
        errors = self._label_errors(rows, errors)
        good = [i for i in range(n) if not errors[i]]
        resized = [[resize_tensor(decoded[i], scale) for scale in self.extractor.scales] for i in good]
        return self._boxes(rows, errors, good, resized)


def write_results(batch: pa.Table, output: str) -> pa.Table:
    """Write a batch's rows to ``output/boxes`` and ``output/errors`` and return its counts.

    File names come from the batch's image ids, and each file appears whole (written to a
    temporary name, then renamed), so a retried task rewrites the same file and a killed
    run leaves no partial file: every image is in exactly one file. Each file's metadata
    records its rows per input shard (:data:`SHARDS_KEY`).
    """
    rows = batch.to_pydict()
    n = len(rows["image_id"])
    recorded = "shard" in rows and "shard_total" in rows  # rows from read_shard; bare batches in tests lack them
    shards = rows.get("shard") or [""] * n
    totals = rows.get("shard_total") or [0] * n
    ok = [i for i, e in enumerate(rows["error"]) if not e]
    bad = [i for i, e in enumerate(rows["error"]) if e]
    digest = hashlib.sha1("\n".join(rows["image_id"]).encode()).hexdigest()[:20]
    if ok:
        table = pa.table({
            "image_id": [rows["image_id"][i] for i in ok], "label": [rows["label"][i] for i in ok],
            "width": [rows["width"][i] for i in ok], "height": [rows["height"][i] for i in ok],
            "boxes": [rows["boxes"][i] for i in ok], "scores": [rows["scores"][i] for i in ok],
        }, schema=BOXES_SCHEMA)
        _write_atomic(table, Path(output) / "boxes" / f"part-{digest}.parquet",
                      _shard_counts(ok, shards, totals) if recorded else None)
    if bad:
        retry = rows.get("retry") or [False] * n
        table = pa.table({"image_id": [rows["image_id"][i] for i in bad], "label": [rows["label"][i] for i in bad],
                          "error": [rows["error"][i] for i in bad], "retry": [bool(retry[i]) for i in bad],
                          "shard": [shards[i] for i in bad]}, schema=ERRORS_SCHEMA)
        _write_atomic(table, Path(output) / "errors" / f"part-{digest}.parquet",
                      _shard_counts(bad, shards, totals) if recorded else None)
    return pa.table({"images": [len(ok)], "errors": [len(bad)], "boxes": [sum(len(rows["boxes"][i]) for i in ok)]})


def _shard_counts(indices: list[int], shards: list[str], totals: list[int]) -> dict[str, list[int]]:
    counts: dict[str, list[int]] = {}
    for i in indices:
        counts.setdefault(shards[i], [0, int(totals[i])])[0] += 1
    return counts


def _write_atomic(table: pa.Table, path: Path, shard_counts: dict[str, list[int]] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if shard_counts is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               SHARDS_KEY: json.dumps(shard_counts).encode()})
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    pq.write_table(table, partial)
    os.replace(partial, path)


def _file_shards(path: Path) -> dict[str, list[int]] | None:
    """A file's :data:`SHARDS_KEY` record, from its footer; None for files written before it."""
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[SHARDS_KEY]) if SHARDS_KEY in metadata else None


def drop_retryable_errors(output: str | Path) -> int:
    """Remove from ``output/errors`` the rows whose failure may pass (``retry``), so that a rerun
    tries those images again; return how many. Each file is rewritten whole (or removed),
    with its shard record recounted.

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
        if not any(keep):
            path.unlink()
            continue
        kept = table.filter(pa.array(keep))
        recorded = _file_shards(path)
        counts = None
        if recorded is not None and "shard" in kept.column_names:
            counts = {}
            for shard in kept.column("shard").to_pylist():
                counts.setdefault(shard, [0, recorded.get(shard, [0, 0])[1]])[0] += 1
        _write_atomic(kept.replace_schema_metadata(None), path, counts)
    return dropped


@dataclass
class Progress:
    """What an output holds, by input shard, read from its files' footers (:func:`read_progress`).

    ``rows``: shard -> rows written; ``totals``: shard -> the shard's record count as written
    (-1 where two files disagree, the input having changed); ``files``: shard -> the files
    holding its rows; ``legacy``: files without a shard record (written before it), whose
    images only their ids tell, and ``legacy_rows`` their row count.
    """

    rows: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    files: dict[str, list[str]] = field(default_factory=dict)
    legacy: list[str] = field(default_factory=list)
    legacy_rows: int = 0

    @property
    def images(self) -> int:
        """Rows written (images and errors)."""
        return sum(self.rows.values()) + self.legacy_rows

    def complete(self) -> set[str]:
        """Shards all of whose records are written."""
        return {shard for shard, rows in self.rows.items() if shard and rows == self.totals.get(shard)}


def read_progress(output: str | Path) -> Progress:
    """The shards ``output`` holds and how much of each, from file footers alone (no ids read)."""
    progress = Progress()
    for sub in ("boxes", "errors"):
        for path in sorted((Path(output) / sub).glob("part-*.parquet")):
            recorded = _file_shards(path)
            if recorded is None:
                progress.legacy.append(str(path))
                progress.legacy_rows += pq.read_metadata(path).num_rows
                continue
            for shard, (rows, total) in recorded.items():
                progress.rows[shard] = progress.rows.get(shard, 0) + rows
                seen = progress.totals.setdefault(shard, total)
                if seen != total:
                    progress.totals[shard] = -1
                progress.files.setdefault(shard, []).append(str(path))
    return progress


def read_done_ids(output: str | Path, files: list[str] | None = None) -> frozenset[str]:
    """Image ids written under ``output`` (every file, or only ``files``)."""
    if files is None:
        files = [str(p) for sub in ("boxes", "errors") for p in sorted((Path(output) / sub).glob("part-*.parquet"))]
    done: set[str] = set()
    for path in files:
        done.update(pq.read_table(path, columns=["image_id"]).column(0).to_pylist())
    return frozenset(done)


def plan_resume(shards: list[dict], progress: Progress, output: str | Path) -> tuple[list[dict], str]:
    """The shards still to read, each given the ids of its images already written (``skip``),
    and a line saying how the plan was made.

    Complete shards are dropped from their footers' record alone; only the files holding
    partly written shards (those in flight when a run stopped) have their ids read. Outputs
    written before shard records, or whose shards the listing no longer has (another
    ``shard_size``, or a changed input), fall back to reading every id, so that nothing is
    mined twice.
    """
    from dap_ray.data.sources import shard_key

    complete = progress.complete()
    planned = {shard["shard_id"] for shard in shards}
    stale = [shard for shard in progress.rows if shard not in planned]
    if progress.legacy or stale:
        done = read_done_ids(output)
        how = (f"read all {len(done)} ids written: {len(progress.legacy)} file(s) have no shard record and "
               f"{len(stale)} recorded shard(s) are not in this listing")
        complete = set()
    else:
        partial = [shard for shard in progress.rows if shard not in complete]
        files = sorted({path for shard in partial for path in progress.files[shard]})
        done = read_done_ids(output, files)
        how = (f"{len(complete)} shard(s) complete by their files' records, the ids of {len(partial)} partly "
               f"written shard(s) read from {len(files)} file(s)")
    by_key: dict[str, list[str]] = {}
    for image_id in done:
        by_key.setdefault(shard_key(image_id, shards[0]["format"] if shards else "tar"), []).append(image_id)
    remaining = [{**shard, "skip": sorted(by_key.get(shard["key"], []))} for shard in shards
                 if shard["shard_id"] not in complete]
    return remaining, how
