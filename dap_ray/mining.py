"""The stages of Step 2 as plain functions and callable classes over pyarrow batches.

:mod:`dap_ray.pipeline` strings them together on Ray Data; here they import no Ray and are
tested directly. Images cross stages as encoded or raw bytes plus their shapes, never as
ragged tensor columns.

Output rows (``boxes/*.parquet``): ``image_id`` string, ``label`` int32, ``width`` and
``height`` int32 (original image), ``boxes`` list of 4-float lists (xyxy, original-image
pixels), ``scores`` list of floats. Error rows (``errors/*.parquet``): ``image_id``,
``label``, ``error`` (a readable reason).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dap_ray.boxes import BoxConfig, cam_to_boxes_batch
from dap_ray.data import MAX_IMAGE_PIXELS, BadImageError, decode_image

# Smaller images hold nothing a stride-32 CAM can localise.
MIN_IMAGE_SIDE = 8
# CPU pools: on 2 cores two one-thread actors mine about 15% faster than one actor on both
# cores, whose threads stall whenever another process takes a core (benchmarks/bench_mine.py);
# more actors multiply memory (about 7 GB each for ResNet-50 at 288+576, batch 32).
MAX_CPU_ACTORS = 2

__all__ = ["BOXES_SCHEMA", "ERRORS_SCHEMA", "CamBoxStage", "MineConfig", "decode_and_resize", "pool_problem",
           "resolve_actor_pool", "write_results"]

BOXES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("label", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))), ("scores", pa.list_(pa.float32())),
])
ERRORS_SCHEMA = pa.schema([("image_id", pa.string()), ("label", pa.int32()), ("error", pa.string())])


@dataclass(frozen=True)
class MineConfig:
    """Step 2 (pseudo boxes). Defaults are the paper's; with no ``input`` the built-in sample runs."""

    input: str | None = field(default=None, metadata={
        "help": "images to mine (default: the built-in sample set, generated and a classifier trained on first use)"})
    format: Literal["folder", "tar", "parquet"] = field(default="folder", metadata={
        "help": "folder: ROOT/<class>/<image>; tar: tar shards (one per class, or WebDataset .cls); "
                "parquet: files with image and label columns"})
    output: str = field(default="dap_output", metadata={"help": "output folder"})
    classifier: str = field(default="resnet50", metadata={"help": "torchvision name or package.module:factory"})
    weights: str | None = field(default=None, metadata={"help": "classifier state dict (a torchvision ImageNet checkpoint, or classifier.pt)"})
    class_map: str | None = field(default=None, metadata={
        "help": "class names, one per line, line i = classifier output i (folder default: sorted folder names)"})
    num_classes: int | None = field(default=None, metadata={"help": "classifier outputs (default: from the weights or class map)"})
    scales: tuple[int, ...] = field(default=(288, 576), metadata={"help": "CAM short sides"})
    flip: bool = field(default=True, metadata={"help": "average with the mirrored image"})
    thresholds: tuple[float, ...] = field(default=(0.2, 0.3, 0.4, 0.5), metadata={"help": "CAM thresholds"})
    nms_iou: float = field(default=0.8, metadata={"help": "NMS IoU"})
    preset: Literal["official", "paper"] = field(default="official", metadata={
        "help": "official: the authors' released script; paper: the equations as printed"})
    batch_size: int = field(default=32, metadata={"help": "images per model batch"})
    num_gpus_per_actor: float = field(default=0.0, metadata={"help": "GPUs per model actor (0: CPU actors)"})
    actors: tuple[int, ...] | None = field(default=None, metadata={
        "help": "MIN MAX model actors, an autoscaling pool (default: 1 1 with GPUs; on CPU a fixed pool of "
                f"one actor per CPU of the largest node, at most {MAX_CPU_ACTORS})"})
    cpus_per_actor: float | None = field(default=None, metadata={
        "help": "CPUs Ray reserves per model actor (default: 1 with GPUs; on CPU, the node's CPUs less the one "
                "kept for the read and write tasks, shared among the actors)"})
    torch_threads: int | None = field(default=None, metadata={
        "help": "torch threads per CPU actor (default: the node's CPUs over the largest pool)"})
    shard_size: int = field(default=64, metadata={"help": "folder images per read task (smaller streams sooner)"})
    limit: int | None = field(default=None, metadata={"help": "mine at most this many images"})
    gt_boxes: str | None = field(default=None, metadata={"help": "COCO file of true boxes: report quality in summary.json"})
    image_column: str = field(default="image", metadata={"help": "parquet: image column (bytes or path)"})
    label_column: str = field(default="label", metadata={"help": "parquet: label column (int or class name)"})

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"scales must be positive, got {self.scales}")
        if self.actors is not None and (len(self.actors) != 2 or not 1 <= self.actors[0] <= self.actors[1]):
            raise ValueError(f"actors must be MIN MAX with 1 <= MIN <= MAX, got {self.actors}")
        if self.cpus_per_actor is not None and self.cpus_per_actor < 0:
            raise ValueError(f"cpus_per_actor must be at least 0, got {self.cpus_per_actor}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be at least 1, got {self.torch_threads}")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        self.box_config()  # thresholds, nms_iou and preset checked where they live

    def box_config(self) -> BoxConfig:
        return BoxConfig.from_preset(self.preset, scale=max(self.scales), thresholds=self.thresholds, nms_iou=self.nms_iou)


def resolve_actor_pool(cfg: MineConfig, node_cpus: int, shards: int | None = None) -> MineConfig:
    """``cfg`` with the model pool's defaults filled in for a cluster whose largest node has ``node_cpus``.

    With GPUs: ``actors`` (1, 1), ``cpus_per_actor`` 1. On CPU: a fixed pool of
    ``min(node_cpus, MAX_CPU_ACTORS, shards)`` actors (no more than there are input shards
    to feed them) that together reserve all but one of the node's CPUs (the read and write
    tasks need one each), ``torch_threads`` the node's CPUs over the largest pool. Values
    the user set are kept.
    """
    if cfg.num_gpus_per_actor > 0:
        return replace(cfg, actors=cfg.actors or (1, 1),
                       cpus_per_actor=1.0 if cfg.cpus_per_actor is None else cfg.cpus_per_actor)
    node_cpus = max(1, int(node_cpus))
    actors = cfg.actors
    if actors is None:
        size = max(1, min(node_cpus, MAX_CPU_ACTORS, shards or MAX_CPU_ACTORS))
        if cfg.cpus_per_actor:  # as many as fit beside the task CPU
            size = max(1, min(size, int((node_cpus - 1) / cfg.cpus_per_actor)))
        actors = (size, size)
    cpus = cfg.cpus_per_actor
    if cpus is None:
        cpus = round(max(0, node_cpus - 1) / actors[1], 3)
    threads = cfg.torch_threads or max(1, node_cpus // actors[1])
    return replace(cfg, actors=tuple(actors), cpus_per_actor=cpus, torch_threads=threads)


def pool_problem(cfg: MineConfig, cluster_cpus: float) -> str | None:
    """Why the smallest model pool would leave no CPU for the read and write tasks, or None.

    Ray would then wait forever for a CPU: the actors hold them all.
    """
    held = cfg.actors[0] * cfg.cpus_per_actor
    if held > cluster_cpus - 1:
        return (f"{cfg.actors[0]} model actor(s) x {cfg.cpus_per_actor:g} CPUs would hold {held:g} of the cluster's "
                f"{cluster_cpus:g} CPUs, leaving less than the 1 CPU the read and write tasks need: "
                f"lower --actors or --cpus-per-actor")
    return None


def decode_and_resize(batch: pa.Table, scales: tuple[int, ...], max_pixels: int = MAX_IMAGE_PIXELS) -> pa.Table:
    """Records from :func:`dap_ray.sources.read_shard` to decoded images resized to each scale.

    Output columns: ``image_id``, ``label``, ``width``, ``height``, ``error``, and per scale j
    ``pixels{j}`` (raw (h, w, 3) uint8 bytes), ``h{j}``, ``w{j}``. Unreadable images keep
    their row with an ``error`` and no pixels.
    """
    # Imported here: torch costs the job's driver, which never decodes, 3 s of start-up.
    from dap_ray.cam import resize_short_side

    rows = batch.to_pydict()
    out: dict[str, list] = {k: [] for k in ("image_id", "label", "width", "height", "error")}
    for j in range(len(scales)):
        out.update({f"pixels{j}": [], f"h{j}": [], f"w{j}": []})
    for image_id, label, data, error in zip(rows["image_id"], rows["label"], rows["data"], rows["error"]):
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

        from dap_ray.cam import CamExtractor
        from dap_ray.models import load_classifier

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
        table = pa.table({"image_id": [rows["image_id"][i] for i in bad], "label": [rows["label"][i] for i in bad],
                          "error": [rows["error"][i] for i in bad]}, schema=ERRORS_SCHEMA)
        _write_atomic(table, Path(output) / "errors" / f"part-{digest}.parquet")
    return pa.table({"images": [len(ok)], "errors": [len(bad)], "boxes": [sum(len(rows["boxes"][i]) for i in ok)]})


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    pq.write_table(table, partial)
    os.replace(partial, path)


def read_done_ids(output: str | Path) -> frozenset[str]:
    """Image ids already written under ``output`` (for resuming)."""
    done: set[str] = set()
    for sub in ("boxes", "errors"):
        for path in sorted((Path(output) / sub).glob("part-*.parquet")):
            done.update(pq.read_table(path, columns=["image_id"]).column(0).to_pylist())
    return frozenset(done)
