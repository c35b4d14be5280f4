"""Step 3's training data: a mining run's pseudo boxes, held and served to a detector.

The mining run's ``boxes/*.parquet`` (xyxy pixels of the original image) is held in flat
arrays (:class:`PseudoBoxes`: no Python object per box, so millions of images fit in a
worker) and its images read by id through :class:`dap_ray.data.sources.ImageReader`. No Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dap_ray.data.detection import resize_with_boxes
from dap_ray.data.loading import ReplacingDataset

__all__ = ["PseudoBoxDataset", "PseudoBoxes", "load_pseudo_boxes"]


@dataclass(frozen=True)
class PseudoBoxes:
    """A mining run's pseudo boxes as flat arrays.

    ``image_ids``: n strings; ``labels``: (n,) int64 classifier labels (0-based);
    ``sizes``: (n, 2) int32 original (width, height); ``offsets``: (n + 1,) int64, image
    i's boxes are ``boxes[offsets[i]:offsets[i + 1]]``, xyxy float32 pixels of the
    original image, best score first. Images without boxes are not held.
    """

    image_ids: list[str]
    labels: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    skipped_without_boxes: int = 0
    skipped_without_label: int = 0

    def __len__(self) -> int:
        return len(self.image_ids)

    def boxes_of(self, index: int) -> np.ndarray:
        return self.boxes[self.offsets[index] : self.offsets[index + 1]]


def load_pseudo_boxes(boxes_dir: str | Path, max_boxes_per_image: int | None = None) -> PseudoBoxes:
    """Read ``boxes_dir/*.parquet`` (as :func:`dap_ray.localisation.stages.write_results` writes it).

    Keeps at most ``max_boxes_per_image`` boxes per image (the best scored), sorts images by id.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(Path(boxes_dir).glob("*.parquet"))
    if not files:
        raise ValueError(f"no Parquet files in {boxes_dir}: --boxes must be the boxes/ folder of a mining run")
    table = pq.read_table(files, columns=["image_id", "label", "width", "height", "boxes", "scores"])
    table = table.take(pc.sort_indices(table, [("image_id", "ascending")]))
    labels = table.column("label").to_numpy().astype(np.int64)
    counts = pc.list_value_length(table.column("boxes")).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = np.asarray(pc.list_flatten(pc.list_flatten(table.column("boxes"))).to_numpy(zero_copy_only=False),
                      np.float32).reshape(-1, 4)
    scores = np.asarray(pc.list_flatten(table.column("scores")).to_numpy(zero_copy_only=False), np.float32)
    starts = np.concatenate([[0], np.cumsum(counts)])
    keep_counts = counts if max_boxes_per_image is None else np.minimum(counts, max_boxes_per_image)
    has_label = labels >= 0
    kept = (keep_counts > 0) & has_label
    box_rows = []
    for i in np.flatnonzero(kept):
        order = np.argsort(-scores[starts[i] : starts[i + 1]], kind="stable")[: keep_counts[i]]
        box_rows.append(starts[i] + order)
    chosen = np.concatenate(box_rows) if box_rows else np.zeros(0, np.int64)
    ids = table.column("image_id").to_pylist()
    return PseudoBoxes(
        image_ids=[ids[i] for i in np.flatnonzero(kept)],
        labels=labels[kept],
        sizes=np.stack([table.column("width").to_numpy(), table.column("height").to_numpy()], 1).astype(np.int32)[kept],
        offsets=np.concatenate([[0], np.cumsum(keep_counts[kept])]).astype(np.int64),
        boxes=flat[chosen] if len(chosen) else np.zeros((0, 4), np.float32),
        skipped_without_boxes=int(((keep_counts == 0) & has_label).sum()),
        skipped_without_label=int((~has_label).sum()),
    )


class PseudoBoxDataset(ReplacingDataset):
    """Training samples keyed by ``(index, short_side, flip)`` (:class:`AspectBatchSampler` keys).

    Returns ``{"image": (3, h, w) uint8 tensor, "boxes": (N, 4) float32 xyxy pixels of the
    resized image, "labels": (N,) int64 = label + 1, "image_id": str}``. An image that
    cannot be read or no longer has the size it was mined at is named in a warning and
    replaced by the next image.
    """

    def __init__(self, pseudo: PseudoBoxes, reader, max_size: int = 1333):
        self.pseudo, self.reader, self.max_size = pseudo, reader, max_size

    def __len__(self) -> int:
        return len(self.pseudo)

    def _describe(self, index: int) -> str:
        return repr(self.pseudo.image_ids[index])

    def _load(self, index: int, short_side: int, flip: bool) -> dict | None:
        from dap_ray.data.images import BadImageError, decode_image

        image_id = self.pseudo.image_ids[index]
        try:
            image = decode_image(self.reader.read(image_id))
        except (OSError, KeyError, BadImageError) as exc:
            print(f"skipping {image_id}: {exc}", flush=True)
            return None
        width, height = (int(v) for v in self.pseudo.sizes[index])
        if image.shape[:2] != (height, width):
            print(f"skipping {image_id}: it is {image.shape[1]}x{image.shape[0]} but was mined at {width}x{height}",
                  flush=True)
            return None
        resized, boxes, _ = resize_with_boxes(image, self.pseudo.boxes_of(index), short_side, self.max_size, flip)
        label = int(self.pseudo.labels[index]) + 1
        return {"image": torch.from_numpy(resized).permute(2, 0, 1), "boxes": torch.from_numpy(boxes),
                "labels": torch.full((len(boxes),), label, dtype=torch.int64), "image_id": image_id}
