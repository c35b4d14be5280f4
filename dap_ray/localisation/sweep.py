"""What a box sweep needs, as plain numpy: CAMs computed once and kept compact on disk
(:class:`CamCache`), and the quality of the boxes a :class:`BoxConfig` draws from them
against true boxes (:func:`score_box_config`). Ray Tune runs the trials
(:mod:`dap_ray.steps.tune`); each recomputes only CAM -> boxes, which is cheap.

The objective is AP50 of the scored pseudo boxes, per class as COCO computes it
(pycocotools' ``COCOeval``, IoU 0.5, 101-point interpolation, 100 boxes per image): each
box carries its image's label and a score (area over the first box's, as mining writes
them). Emitting more boxes cannot raise it without raising precision too, unlike any-hit.
CorLoc, any-hit, mean best IoU, boxes per image and VOC AP50 are reported beside it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dap_ray.localisation.boxes import BoxConfig, cam_to_boxes_batch

__all__ = ["CamCache", "compute_cam_cache", "fingerprint", "score_box_config"]


@dataclass(frozen=True)
class CamCache:
    """CAMs of labelled images, flat and float16 (a CAM is in [0, 1]: 3 decimal digits are plenty).

    ``image_ids``: n ids (the ground truth's ``file_name``); ``labels``: (n,) int64 classifier
    labels; ``sizes``: (n, 2) int32 original (width, height); ``shapes``: (n, 2) int32 CAM
    (rows, columns) on the largest scale's stride grid; ``offsets``: (n + 1,) int64 into
    ``values``, the flat float16 cells; ``scale``: that largest scale.
    """

    image_ids: list[str]
    labels: np.ndarray
    sizes: np.ndarray
    shapes: np.ndarray
    offsets: np.ndarray
    values: np.ndarray
    scale: int

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if self.labels.shape != (n,) or self.sizes.shape != (n, 2) or self.shapes.shape != (n, 2):
            raise ValueError(f"a CamCache of {n} images needs labels (n,), sizes and shapes (n, 2)")
        if self.offsets.shape != (n + 1,) or self.offsets[-1] != len(self.values):
            raise ValueError("CamCache offsets must run from 0 to the number of cells")

    def __len__(self) -> int:
        return len(self.image_ids)

    def cams(self) -> list[np.ndarray]:
        """The CAMs as float32 (h, w) arrays."""
        return [self.values[a:b].astype(np.float32).reshape(shape)
                for a, b, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes.tolist())]

    def save(self, path: str | Path, key: str) -> Path:
        """Write to ``path`` (``.npz``) with ``key`` (what it was computed from, see :func:`fingerprint`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial.npz")
        np.savez(partial, image_ids=np.asarray(self.image_ids, dtype=object).astype(str), labels=self.labels,
                 sizes=self.sizes, shapes=self.shapes, offsets=self.offsets, values=self.values,
                 scale=np.asarray(self.scale), key=np.asarray(key))
        partial.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, key: str) -> CamCache | None:
        """The cache at ``path`` if it was computed from ``key``, else None (compute it again)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["key"]) != key:
                    return None
                return cls(image_ids=[str(i) for i in data["image_ids"]], labels=data["labels"], sizes=data["sizes"],
                           shapes=data["shapes"], offsets=data["offsets"], values=data["values"],
                           scale=int(data["scale"]))
        except (OSError, KeyError, ValueError):
            return None


def fingerprint(**inputs: object) -> str:
    """A key for what a cache was computed from: the inputs' values, and the size and modification
    time of each that names a file (so replacing the weights invalidates it)."""
    described = {}
    for name, value in sorted(inputs.items()):
        described[name] = value
        if isinstance(value, str) and Path(value).is_file():
            stat = Path(value).stat()
            described[name] = [value, stat.st_size, stat.st_mtime_ns]
    return hashlib.sha1(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def compute_cam_cache(images: Iterable[tuple[str, int, np.ndarray]], extractor, batch_size: int = 32) -> CamCache:
    """CAMs of ``(image_id, label, (H, W, 3) uint8 RGB)`` items with a
    :class:`dap_ray.localisation.cam.CamExtractor`, in batches of ``batch_size``."""
    ids: list[str] = []
    labels: list[int] = []
    sizes: list[tuple[int, int]] = []
    cams: list[np.ndarray] = []
    batch: list[tuple[str, int, np.ndarray]] = []

    def flush() -> None:
        if batch:
            maps = extractor([image for _, _, image in batch], [label for _, label, _ in batch])
            for (image_id, label, image), cam in zip(batch, maps):
                ids.append(image_id)
                labels.append(label)
                sizes.append((image.shape[1], image.shape[0]))
                cams.append(cam.astype(np.float16))
            batch.clear()

    for item in images:
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    flush()
    shapes = np.asarray([c.shape for c in cams], np.int32).reshape(-1, 2)
    counts = shapes[:, 0].astype(np.int64) * shapes[:, 1]
    return CamCache(image_ids=ids, labels=np.asarray(labels, np.int64), sizes=np.asarray(sizes, np.int32).reshape(-1, 2),
                    shapes=shapes, offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                    values=np.concatenate([c.reshape(-1) for c in cams]) if cams else np.zeros(0, np.float16),
                    scale=int(max(extractor.scales)))


def score_box_config(cache: CamCache, cams: Sequence[np.ndarray], ground_truth: dict, box_config: BoxConfig,
                     category_ids: Sequence[int]) -> dict:
    """Quality of the boxes ``box_config`` draws from ``cams`` (``cache.cams()``, decoded once by the
    caller) against ``ground_truth`` (a COCO dict whose ``file_name`` s are the cache's ids).

    ``category_ids[label]`` is the ground truth's category of classifier label ``label``.
    Returns ``AP50`` (the objective, see the module docstring), ``AP``, ``VOC_AP50``,
    ``corloc``, ``any_hit``, ``mean_best_iou``, ``boxes_per_image`` and ``images`` (scored
    images: those in the ground truth).
    """
    from dap_ray.evaluation.detection import detections_to_coco_results, evaluate_detections
    from dap_ray.evaluation.localisation import localisation_quality

    by_name = {image["file_name"]: image["id"] for image in ground_truth["images"]}
    keep = [i for i, image_id in enumerate(cache.image_ids) if image_id in by_name]
    if not keep:
        raise ValueError("none of the cached images is in the ground truth (their ids are its file_names)")
    drawn = cam_to_boxes_batch([cams[i] for i in keep], [tuple(cache.sizes[i]) for i in keep], box_config)
    results = detections_to_coco_results(
        [by_name[cache.image_ids[i]] for i in keep], [b for b, _ in drawn], [s for _, s in drawn],
        [np.full(len(b), cache.labels[i]) for i, (b, _) in zip(keep, drawn)], list(category_ids))
    metrics = evaluate_detections(ground_truth, results)
    truth: dict[str, list] = {}
    names = {image["id"]: image["file_name"] for image in ground_truth["images"]}
    for annotation in ground_truth["annotations"]:
        x, y, w, h = annotation["bbox"]
        truth.setdefault(names[annotation["image_id"]], []).append([x, y, x + w, y + h])
    predictions = {cache.image_ids[i]: pair for i, pair in zip(keep, drawn)}
    quality = localisation_quality(predictions, {k: np.asarray(v, np.float32) for k, v in truth.items()})
    return {"AP50": metrics["AP50"], "AP": metrics["AP"], "VOC_AP50": metrics["VOC_AP50"], **quality}
