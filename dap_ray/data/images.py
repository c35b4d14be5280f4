"""Reading classification datasets: class maps, ImageNet-style folder trees, image decoding.

Plain Python/PIL/numpy; no Ray. Every image comes out as an (H, W, 3) uint8 RGB array;
colour modes are converted rather than rejected, and unreadable inputs raise
:class:`BadImageError` with a reason that can go into an errors table.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "BadImageError", "FolderListing",
    "class_folder_files", "class_folders", "classifier_classes", "decode_image", "exif_orientation",
    "first_class_difference", "list_image_folder", "read_class_map",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"})
# Larger images are refused (decompression bombs): 16k x 16k (268M pixels) covers any real photo.
MAX_IMAGE_PIXELS = 16384 * 16384


class BadImageError(ValueError):
    """An input that cannot become an RGB image; the message is the reason."""


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image bytes to an (H, W, 3) uint8 RGB array, turned upright by its EXIF orientation.

    The EXIF orientation tag is applied (as viewers, detectron2's ``read_image`` and
    torchvision's ``decode_image(..., apply_exif_orientation=True)`` do), so H and W, and
    every box in the image's pixels, are those of the upright image, in mining, export and
    training alike. Grayscale, palette, CMYK, alpha (dropped) and 16-bit images are
    converted. Raises :class:`BadImageError` for empty, truncated, corrupt or non-image
    data and for images of more than ``max_pixels`` pixels (checked from the header,
    before decoding).
    """
    if not data:
        raise BadImageError("empty file")
    guard = Image.MAX_IMAGE_PIXELS
    # PIL's own guard would refuse from 179M pixels (twice its default): ours, from the header
    # just below and before any decoding, is the one limit.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise BadImageError(f"image of {width}x{height} pixels exceeds the {max_pixels}-pixel limit")
            if width < 1 or height < 1:
                raise BadImageError(f"image has no pixels ({width}x{height})")
            image.load()
            # Turned as ImageOps.exif_transpose turns it, without rewriting the EXIF, whose
            # other malformed fields would fail there (a resolution stored as text, say).
            method = _EXIF_TRANSPOSE.get(exif_orientation(image))
            return _to_rgb(image.transpose(method) if method is not None else image)
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"corrupt or truncated image: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a decoder's own fault on malformed data: an error row, not a crash
        raise BadImageError(f"corrupt image ({type(exc).__name__}: {exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = guard


# EXIF orientation -> the transposition that turns the image upright (PIL's exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(image: Image.Image) -> int:
    """An opened image's EXIF orientation (1 to 8; XMP's when EXIF has none) as PIL's
    ``ImageOps.exif_transpose`` reads it: a value that is not one of 1 to 8 (text, 6.5) and
    an unreadable EXIF block count as 1, upright."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block turns nothing
        return 1
    return int(float(value)) if value in _EXIF_TRANSPOSE else 1


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) grayscale: scale to 8 bits instead of clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        span = values.max() - values.min()
        gray = ((values - values.min()) / span * 255 if span > 0 else np.zeros_like(values)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def read_class_map(path: str | Path) -> list[str]:
    """Class names, one per line (line i is classifier output i).

    Only a line's first token is the name, so ImageNet's ``LOC_synset_mapping.txt``
    (``n01440764 tench, Tinca tinca``) works as it is. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"class map not found: {path}")
    names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class map {path} lists no classes")
    seen: set[str] = set()
    duplicates = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if duplicates:
        raise ValueError(f"class map {path} lists some classes twice: {duplicates[:5]}")
    return names


def classifier_classes(weights: str | Path | None) -> list[str] | None:
    """The class names, in output order, of a classifier that Step 1 trained: the ``classes`` of
    the ``meta.json`` beside its weights file. None for other weights (a model zoo checkpoint)."""
    if not weights:
        return None
    meta = Path(weights).resolve().parent / "meta.json"
    if not meta.is_file():
        return None
    try:
        classes = json.loads(meta.read_text()).get("classes")
    except (OSError, ValueError):
        return None
    return [str(c) for c in classes] if isinstance(classes, list) and classes else None


def first_class_difference(given: list[str], expected: list[str]) -> str | None:
    """Where two class orders first part, in words (line numbers from 1), or None when they agree."""
    for i, (a, b) in enumerate(zip(given, expected)):
        if a != b:
            return f"line {i + 1} is {a!r} where the classifier has {b!r}"
    if len(given) != len(expected):
        return f"it lists {len(given)} classes where the classifier has {len(expected)}"
    return None


@dataclass
class FolderListing:
    """Images of a ``ROOT/<class>/<image>`` tree.

    ``items``: (path relative to the root, label) pairs, sorted by path. ``classes``: line
    i is label i. ``unknown_folders``: folders not in the class map (not listed in
    ``items``); ``unknown_items``: the image paths inside them, sorted, so that mining can
    report each as an error. ``skipped_files``: files that are not images by extension,
    or lie outside any class folder.
    """

    root: Path
    items: list[tuple[str, int]]
    classes: list[str]
    unknown_folders: list[str] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    unknown_items: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Human-readable lines for what was not listed."""
        lines = []
        if self.unknown_folders:
            lines.append(f"{len(self.unknown_folders)} folder(s) not in the class map "
                         f"({len(self.unknown_items)} images): " + ", ".join(self.unknown_folders[:10]))
        if self.skipped_files:
            lines.append(f"{len(self.skipped_files)} non-image or unfiled file(s) were skipped: "
                         + ", ".join(self.skipped_files[:10]))
        return lines


def class_folders(root: Path, class_map: str | Path | None = None) -> tuple[list[str], list[str], list[str]]:
    """The top of a ``root/<class>/<image>`` tree, in one pass: its sorted class folders, the
    files lying beside them (sorted), and the class names (``class_map``'s, else the folders).

    Raises ``ValueError`` when ``root`` is not a folder or there are no classes.
    """
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    entries = list(os.scandir(root))
    folders = sorted(entry.name for entry in entries if entry.is_dir())
    files = sorted(entry.name for entry in entries if entry.is_file())
    classes = read_class_map(class_map) if class_map is not None else folders
    if not classes:
        raise ValueError(f"{root} has no class folders")
    return folders, files, list(classes)


def class_folder_files(root: str | Path, name: str) -> tuple[list[str], list[str]]:
    """(images, other files) under ``root/name``, as sorted paths relative to ``root`` with ``/``.

    The one listing of a class folder: mining lists each in its own task and reads a range
    of it later, so both must see the same order (sorted names, sub-folders walked sorted).
    """
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(Path(root) / name):
        dirnames.sort()
        for filename in sorted(filenames):
            relative = os.path.relpath(os.path.join(dirpath, filename), root).replace(os.sep, "/")
            (images if os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS else others).append(relative)
    return images, others


def list_image_folder(root: str | Path, class_map: str | Path | None = None) -> FolderListing:
    """List ``root/<class>/<image>`` (ImageNet-1K's train layout, nested folders allowed).

    Labels come from ``class_map`` (see :func:`read_class_map`); without one, from the
    sorted folder names.
    """
    root = Path(root)
    folders, skipped, classes = class_folders(root, class_map)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in folders if name not in index]
    items, unknown_items = [], []
    for name in folders:
        images, others = class_folder_files(root, name)
        skipped.extend(others)
        if name in index:
            items.extend((relative, index[name]) for relative in images)
        else:
            unknown_items.extend(images)
    listing = FolderListing(root, items, list(classes), unknown, skipped, unknown_items)
    for line in listing.problems():
        log.warning("%s: %s", root, line)
    if not items:
        raise ValueError(f"no images found under {root} for the {len(classes)} classes")
    return listing
