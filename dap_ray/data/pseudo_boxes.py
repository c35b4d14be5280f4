"""Step 3's training data: a mining run's pseudo boxes, held and served to a detector.

The mining run's ``boxes/*.parquet`` (xyxy pixels of the original image) is turned once into
a folder of ``.npy`` files (:func:`build_box_cache`: streamed file by file, vectorised, no
Python object per image or box) that every training process then memory-maps
(:func:`load_pseudo_boxes`): opening it reads nothing, the pages are shared by every process
of a node through the page cache, and forked DataLoader processes touch no reference count
(image ids are one UTF-8 byte array and its offsets, never a list of Python strings).
The cache sits beside the boxes (``RUN/pretrain_cache/boxes-<fingerprint>``) and is rebuilt
when the boxes' files change. Images are read through
:class:`dap_ray.data.locations.LocatedImages`, one positioned read each. No Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dap_ray.data.detection import resize_with_boxes
from dap_ray.data.loading import ReplacingDataset

__all__ = ["CACHE_FOLDER", "ImageIds", "PseudoBoxDataset", "PseudoBoxes", "box_cache_folder", "build_box_cache",
           "load_pseudo_boxes", "open_box_cache"]

# Bump when the cache's layout changes: old caches are then rebuilt, never misread.
CACHE_VERSION = 1
CACHE_FOLDER = "pretrain_cache"
_ARRAYS = ("labels", "sizes", "offsets", "boxes", "id_bytes", "id_offsets")


class ImageIds(Sequence):
    """Image ids held as one UTF-8 byte array and (n + 1,) int64 offsets; ``ids[i]`` decodes one."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"image index {index} out of range for {len(self)} images")
        return bytes(self.data[self.offsets[index] : self.offsets[index + 1]]).decode("utf-8")


@dataclass(frozen=True, eq=False)
class PseudoBoxes:
    """A mining run's pseudo boxes as flat arrays (memory-mapped when loaded from the cache).

    Per image i of n, sorted by id: ``labels`` (n,) int32 classifier labels (0-based);
    ``sizes`` (n, 2) int32 original (width, height); ``offsets`` (n + 1,) int64, image i's
    boxes are ``boxes[offsets[i]:offsets[i + 1]]``, xyxy float32 pixels of the original
    image, best score first; ``id_bytes`` (k,) uint8 and ``id_offsets`` (n + 1,) int64, the
    ids' UTF-8 bytes (:attr:`image_ids`). ``max_boxes_per_image`` caps what
    :meth:`boxes_of` gives. Images without boxes or label are not held, only counted.
    ``folder``: the cache folder the arrays are mapped from (None when built in memory);
    a pickled instance then travels as that path and maps it again.
    """

    labels: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    id_bytes: np.ndarray
    id_offsets: np.ndarray
    max_boxes_per_image: int | None = None
    skipped_without_boxes: int = 0
    skipped_without_label: int = 0
    folder: str | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.sizes.shape != (n, 2) or self.offsets.shape != (n + 1,) or self.id_offsets.shape != (n + 1,):
            raise ValueError(f"pseudo boxes of {n} images with sizes {self.sizes.shape}, offsets "
                             f"{self.offsets.shape}, id offsets {self.id_offsets.shape}")
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4 or len(self.boxes) != self.offsets[-1]:
            raise ValueError(f"boxes of shape {self.boxes.shape} for offsets ending at {self.offsets[-1]}")

    def __reduce__(self):
        if self.folder is None:
            return super().__reduce__()
        return open_box_cache, (self.folder, self.max_boxes_per_image)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_ids(self) -> ImageIds:
        return ImageIds(self.id_bytes, self.id_offsets)

    def image_id(self, index: int) -> str:
        return self.image_ids[index]

    def boxes_of(self, index: int) -> np.ndarray:
        """(N, 4) float32 xyxy original-image pixels, best first, at most ``max_boxes_per_image``."""
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        if self.max_boxes_per_image is not None:
            stop = min(stop, start + self.max_boxes_per_image)
        return self.boxes[start:stop]

    @property
    def max_label(self) -> int:
        return int(self.labels.max()) if len(self.labels) else -1

    @property
    def num_boxes(self) -> int:
        """Boxes served to training (after ``max_boxes_per_image``)."""
        counts = np.diff(self.offsets)
        return int(counts.sum() if self.max_boxes_per_image is None else
                   np.minimum(counts, self.max_boxes_per_image).sum())


def _fingerprint(files: list[Path]) -> str:
    """What identifies a boxes folder's content: its files' names, sizes and modification times."""
    digest = hashlib.sha1(f"v{CACHE_VERSION}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _box_files(boxes_dir: str | Path) -> list[Path]:
    files = sorted(Path(boxes_dir).glob("*.parquet"))
    if not files:
        raise ValueError(f"no Parquet files in {boxes_dir}: --boxes must be the boxes/ folder of a mining run")
    return files


def box_cache_folder(boxes_dir: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Where the cache of ``boxes_dir``'s current files lives: ``cache_dir`` (default: the mining
    run's folder, beside ``boxes/``) / ``pretrain_cache`` / ``boxes-<fingerprint>``."""
    boxes_dir = Path(boxes_dir)
    base = Path(cache_dir) if cache_dir is not None else boxes_dir.resolve().parent
    return base / CACHE_FOLDER / f"boxes-{_fingerprint(_box_files(boxes_dir))}"


def load_pseudo_boxes(boxes_dir: str | Path, max_boxes_per_image: int | None = None,
                      cache_dir: str | Path | None = None) -> PseudoBoxes:
    """``boxes_dir/*.parquet`` (as :func:`dap_ray.localisation.stages.write_results` writes it),
    memory-mapped from its cache, which is built first if missing (:func:`build_box_cache`).

    Keeps at most ``max_boxes_per_image`` boxes per image (the best scored); images are sorted by id.
    """
    folder = box_cache_folder(boxes_dir, cache_dir)
    if not (folder / "meta.json").is_file():
        build_box_cache(boxes_dir, folder)
    return open_box_cache(str(folder), max_boxes_per_image)


def open_box_cache(folder: str, max_boxes_per_image: int | None = None) -> PseudoBoxes:
    """The pseudo boxes of a cache folder that :func:`build_box_cache` wrote, memory-mapped."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    arrays = {name: _map(Path(folder) / f"{name}.npy") for name in _ARRAYS}
    return PseudoBoxes(**arrays, max_boxes_per_image=max_boxes_per_image,
                       skipped_without_boxes=meta["skipped_without_boxes"],
                       skipped_without_label=meta["skipped_without_label"], folder=str(folder))


def _map(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # numpy cannot map an empty array
        return np.load(path)


def build_box_cache(boxes_dir: str | Path, folder: str | Path, chunk_boxes: int = 1 << 22) -> dict:
    """Write ``folder`` (the arrays of :class:`PseudoBoxes` as ``.npy`` files and ``meta.json``)
    from ``boxes_dir/*.parquet``, one file at a time, and return the meta.

    Memory: the ids once (about 50 bytes an image), four numbers an image, and ``chunk_boxes``
    boxes at a time; boxes go through a scratch file in the order read, then into id order
    (the scratch file is mapped, so its pages count in the process's resident set while the
    boxes are gathered). Written under a temporary name and renamed, so a folder that exists
    is whole; when two processes build at once, the first rename wins and the other's copy is dropped.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files, folder = _box_files(boxes_dir), Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        ids, labels, sizes, counts = [], [], [], []
        skipped_without_boxes = skipped_without_label = 0
        with open(work / "boxes.raw", "wb") as raw:
            for path in files:
                table = pq.read_table(path, columns=["image_id", "label", "width", "height", "boxes", "scores"])
                label = table.column("label").to_numpy().astype(np.int32)
                count = pc.fill_null(pc.list_value_length(table.column("boxes")), 0).to_numpy().astype(np.int64)
                flat = pc.list_flatten(pc.list_flatten(table.column("boxes"))).to_numpy(zero_copy_only=False)
                flat = np.asarray(flat, np.float32).reshape(-1, 4)
                score = np.asarray(pc.list_flatten(table.column("scores")).to_numpy(zero_copy_only=False), np.float32)
                if len(flat) != count.sum() or len(score) != len(flat):
                    raise ValueError(f"{path}: {len(flat)} boxes and {len(score)} scores for {count.sum()} "
                                     "listed boxes")
                kept = (count > 0) & (label >= 0)
                skipped_without_boxes += int(((count == 0) & (label >= 0)).sum())
                skipped_without_label += int((label < 0).sum())
                # Each image's boxes best first (stable on ties): by image, then by falling score.
                owner = np.repeat(np.arange(len(count)), count)
                order = np.lexsort((-score, owner))
                raw.write(np.ascontiguousarray(flat[order[np.repeat(kept, count)[order]]]).tobytes())
                ids.extend(table.column("image_id").filter(pa.array(kept)).cast(pa.large_string()).chunks)
                labels.append(label[kept])
                sizes.append(np.stack([table.column("width").to_numpy(), table.column("height").to_numpy()],
                                      1).astype(np.int32)[kept])
                counts.append(count[kept])
                del table, flat, score, owner, order
        id_array = pa.chunked_array(ids, pa.large_string())
        del ids
        order = pc.sort_indices(id_array).to_numpy()
        _write_ids(id_array, order, work)
        del id_array
        pa.default_memory_pool().release_unused()
        label = np.concatenate(labels) if labels else np.zeros(0, np.int32)
        del labels
        max_label = int(label.max()) if len(label) else -1
        np.save(work / "labels.npy", label[order])
        del label
        np.save(work / "sizes.npy", np.concatenate(sizes)[order] if sizes else np.zeros((0, 2), np.int32))
        del sizes
        count = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        del counts
        start = np.cumsum(count) - count  # each image's first box in the scratch file
        count, start = count[order], start[order]
        offsets = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
        np.save(work / "offsets.npy", offsets)
        _gather_boxes(work / "boxes.raw", work / "boxes.npy", start, count, offsets, chunk_boxes)
        (work / "boxes.raw").unlink()
        meta = {"version": CACHE_VERSION, "boxes_dir": str(Path(boxes_dir).resolve()), "images": len(order),
                "boxes": int(offsets[-1]), "skipped_without_boxes": skipped_without_boxes,
                "skipped_without_label": skipped_without_label, "max_label": max_label}
        (work / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(work, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
        return meta
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _NpyWriter:
    """An ``.npy`` file of known dtype and shape written in pieces, in order, without holding it."""

    def __init__(self, path: Path, dtype, shape: tuple[int, ...]):
        self.handle, self.dtype, self.left = open(path, "wb"), np.dtype(dtype), int(np.prod(shape))
        np.lib.format.write_array_header_1_0(self.handle, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                           "fortran_order": False, "shape": shape})

    def write(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, self.dtype)
        self.left -= values.size
        self.handle.write(values.tobytes())

    def close(self) -> None:
        self.handle.close()
        if self.left:
            raise RuntimeError(f"{self.handle.name}: {self.left} values short")


def _write_ids(ids, order: np.ndarray, work: Path, chunk: int = 1 << 20) -> None:
    """``ids`` (a chunked large_string array) taken in ``order`` into ``id_bytes.npy`` and
    ``id_offsets.npy``, ``chunk`` ids at a time."""
    import pyarrow.compute as pc

    total = int(pc.sum(pc.binary_length(ids)).as_py() or 0) if len(ids) else 0
    data = _NpyWriter(work / "id_bytes.npy", np.uint8, (total,))
    offsets = _NpyWriter(work / "id_offsets.npy", np.int64, (len(order) + 1,))
    offsets.write(np.zeros(1, np.int64))
    written = 0
    for first in range(0, len(order), chunk):
        part = ids.take(order[first : first + chunk]).combine_chunks()
        ends = np.frombuffer(part.buffers()[1], np.int64)[part.offset : part.offset + len(part) + 1]
        data.write(np.frombuffer(part.buffers()[2], np.uint8)[ends[0] : ends[-1]])
        offsets.write(written + ends[1:] - ends[0])
        written += int(ends[-1] - ends[0])
    data.close()
    offsets.close()


def _gather_boxes(raw_path: Path, out_path: Path, start: np.ndarray, count: np.ndarray, offsets: np.ndarray,
                  chunk_boxes: int) -> None:
    """Boxes from the scratch file (images in read order, ``start`` each) into id order, a chunk at a time."""
    total = int(offsets[-1])
    out = _NpyWriter(out_path, np.float32, (total, 4))
    raw = np.memmap(raw_path, dtype=np.float32, mode="r", shape=(total, 4)) if total else None
    first = 0
    while first < len(count):
        last = int(np.searchsorted(offsets, offsets[first] + chunk_boxes, side="right")) - 1
        last = max(last, first + 1)
        # Source row of every box of images first..last: each image's start, then its run.
        source = np.repeat(start[first:last] - offsets[first:last], count[first:last]) + \
            np.arange(offsets[first], offsets[last])
        out.write(raw[source])
        first = last
    out.close()
    del raw


class PseudoBoxDataset(ReplacingDataset):
    """Training samples keyed by ``(index, short_side, flip)`` (:class:`AspectBatchSampler` keys).

    Returns ``{"image": (3, h, w) uint8 tensor, "boxes": (N, 4) float32 xyxy pixels of the
    resized image, "labels": (N,) int64 = label + 1, "image_id": str}``. ``images.read(i)``
    gives image i's encoded bytes (:class:`dap_ray.data.locations.LocatedImages`). An image
    that cannot be read or no longer has the size it was mined at is named in a warning and
    replaced by the next image.
    """

    def __init__(self, pseudo: PseudoBoxes, images, max_size: int = 1333):
        self.pseudo, self.images, self.max_size = pseudo, images, max_size

    def __len__(self) -> int:
        return len(self.pseudo)

    def _describe(self, index: int) -> str:
        return repr(self.pseudo.image_id(index))

    def decoded(self, index: int) -> np.ndarray | None:
        """Image ``index`` as (H, W, 3) uint8 RGB at the size it was mined at, or None (after saying why)."""
        from dap_ray.data.images import BadImageError, decode_image

        try:
            image = decode_image(self.images.read(index))
        except (OSError, KeyError, BadImageError) as exc:
            print(f"skipping {self.pseudo.image_id(index)}: {exc}", flush=True)
            return None
        width, height = (int(v) for v in self.pseudo.sizes[index])
        if image.shape[:2] != (height, width):
            print(f"skipping {self.pseudo.image_id(index)}: it is {image.shape[1]}x{image.shape[0]} but was mined at "
                  f"{width}x{height}", flush=True)
            return None
        return image

    def _load(self, index: int, short_side: int, flip: bool) -> dict | None:
        image = self.decoded(index)
        if image is None:
            return None
        resized, boxes, _ = resize_with_boxes(image, self.pseudo.boxes_of(index), short_side, self.max_size, flip)
        label = int(self.pseudo.labels[index]) + 1
        return {"image": torch.from_numpy(resized).permute(2, 0, 1), "boxes": torch.from_numpy(boxes),
                "labels": torch.full((len(boxes),), label, dtype=torch.int64), "image_id": self.pseudo.image_id(index)}
