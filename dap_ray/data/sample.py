"""A built-in weakly labelled dataset with hidden true boxes.

Each class is a shape (disc, square, triangle, ...) with its own fill pattern (stripes,
checks, dots, ...). An image shows one to three objects of its class, in two random
colours, at a random size, position and
aspect ratio, over a cluttered background of coloured noise, lines, outlines and specks
that are the same for every class, so a classifier has to look at the objects to tell
the classes apart and a CAM has something real to localise. The true boxes are written
in COCO format for evaluation only; training and mining never read them.

Deterministic for a seed: image i is drawn from its own ``(seed, i)`` random stream.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

__all__ = [
    "EXTRA_PATTERNS", "EXTRA_SHAPES", "PATTERNS", "SHAPES", "SampleConfig", "draw_background",
    "make_sample_dataset", "paint_pattern", "render_sample_image", "shape_mask",
]

SHAPES = ("disc", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "crescent", "arrow")
# Shapes and patterns this sample set never draws, kept for the Step 4 downstream sample
# (dap_ray.data.downstream_sample), whose classes must be new to a model pre-trained here.
EXTRA_SHAPES = ("heart", "chevron", "hourglass", "lshape", "semicircle", "frame")
EXTRA_PATTERNS = ("diamonds", "zigzag")


@dataclass(frozen=True)
class SampleConfig:
    """What to generate. Defaults train a resnet18 to >90% top-1 in minutes on 2 cores."""

    num_images: int = field(default=1200, metadata={"help": "images to generate, classes in turn"})
    num_classes: int = field(default=6, metadata={"help": f"classes, up to {len(SHAPES)}"})
    image_size: int = field(default=128, metadata={"help": "short side of every image, in pixels"})
    seed: int = field(default=0, metadata={"help": "the same seed gives the same files"})

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {self.num_images}")
        if not 1 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be between 1 and {len(SHAPES)}, got {self.num_classes}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32 pixels, got {self.image_size}")


def make_sample_dataset(output: str | Path, config: SampleConfig = SampleConfig()) -> Path:
    """Write the sample set under ``output`` and return that path.

    Layout: ``images/<class>/<class>_<i>.jpg`` (an ImageNet-style tree), ``classes.txt``
    (line i is classifier output i), ``gt_boxes.json`` (COCO: ``file_name`` relative to
    ``images/``, xywh ``bbox``, ``category_id`` = class index + 1 since detectors keep 0
    for background) and ``sample_config.json``.
    """
    output = Path(output)
    classes = SHAPES[: config.num_classes]
    for name in classes:
        (output / "images" / name).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(config.num_images):
        label = i % config.num_classes
        image, boxes = render_sample_image(np.random.default_rng([config.seed, i]), label, config.image_size)
        file_name = f"{classes[label]}/{classes[label]}_{i:05d}.jpg"
        cv2.imwrite(str(output / "images" / file_name), image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        images.append({"id": i + 1, "file_name": file_name, "width": image.shape[1], "height": image.shape[0]})
        for x1, y1, x2, y2 in boxes:
            w, h = float(x2 - x1), float(y2 - y1)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": label + 1,
                "bbox": [float(x1), float(y1), w, h], "area": w * h, "iscrowd": 0,
            })
    coco = {
        "info": {"description": "dap_ray built-in sample set", **asdict(config)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(classes)],
    }
    (output / "gt_boxes.json").write_text(json.dumps(coco))
    (output / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    (output / "sample_config.json").write_text(json.dumps(asdict(config), indent=2))
    return output


def render_sample_image(rng: np.random.Generator, label: int, short_side: int) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 RGB image of class ``label`` and its true boxes.

    Returns the image and float32 (N, 4) xyxy pixel boxes (tight around each object).
    """
    aspect = rng.choice([1.0, 4 / 3, 3 / 4, 3 / 2])
    width, height = (round(short_side * aspect), short_side) if aspect >= 1 else (short_side, round(short_side / aspect))
    image = draw_background(rng, width, height)
    count = rng.choice([1, 2, 3], p=[0.7, 0.2, 0.1])
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(count):
        for _attempt in range(20):
            side = rng.uniform(0.35, 0.75 if count == 1 else 0.5) * short_side
            stretch = rng.uniform(0.65, 1.5)
            w, h = int(side * np.sqrt(stretch)), int(side / np.sqrt(stretch))
            w, h = min(w, width - 2), min(h, height - 2)
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            if all(_overlap((x, y, x + w, y + h), b) < 0.05 for b in boxes):
                break
        else:
            continue
        mask = shape_mask(SHAPES[label], w, h, rng)
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            continue
        paint_pattern(image[y : y + h, x : x + w], mask, rng, PATTERNS[label % len(PATTERNS)])
        boxes.append((x + xs.min(), y + ys.min(), x + xs.max() + 1, y + ys.max() + 1))
    return image, np.asarray(boxes, np.float32).reshape(-1, 4)


def _overlap(a, b) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def draw_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """An (height, width, 3) uint8 RGB background: smooth colour noise, lines, outlines, specks."""
    coarse = rng.uniform(40, 215, (rng.integers(2, 6), rng.integers(2, 6), 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    image += rng.normal(0, 10, image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for _ in range(rng.integers(4, 12)):  # lines
        p1 = tuple(int(v) for v in rng.integers(0, (width, height)))
        p2 = tuple(int(v) for v in rng.integers(0, (width, height)))
        cv2.line(image, p1, p2, _colour(rng), int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(rng.integers(2, 6)):  # outlines, never filled like the objects
        centre = tuple(int(v) for v in rng.integers(0, (width, height)))
        axes = tuple(int(v) for v in rng.integers(3, max(4, width // 6), 2))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, _colour(rng), 1, cv2.LINE_AA)
    for _ in range(rng.integers(10, 30)):  # specks
        centre = tuple(int(v) for v in rng.integers(0, (width, height)))
        cv2.circle(image, centre, int(rng.integers(1, 3)), _colour(rng), -1, cv2.LINE_AA)
    return image


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def paint_pattern(patch: np.ndarray, mask: np.ndarray, rng: np.random.Generator, pattern: str) -> None:
    """Fill the (h, w) bool ``mask`` in the (h, w, 3) uint8 ``patch`` (in place) with ``pattern``
    (one of PATTERNS or EXTRA_PATTERNS) in two random colours, the main one far from the
    patch's mean colour. Patterns are mirror-symmetric, so flips keep the class."""
    if pattern not in PATTERNS and pattern not in EXTRA_PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}: expected one of {PATTERNS + EXTRA_PATTERNS}")
    mean = patch.reshape(-1, 3).mean(axis=0)
    candidates = rng.integers(0, 256, (6, 3))
    main = candidates[np.argmax(np.abs(candidates - mean).sum(axis=1))].astype(np.float32)
    second = np.where(main > 127, main * 0.45, main + (255 - main) * 0.55)
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(5, 9)
    on = _pattern(pattern, xx, yy, period)
    fill = np.where(on[..., None], second, main) + rng.normal(0, 5, (h, w, 3))
    soft = cv2.GaussianBlur(mask.astype(np.float32), (3, 3), 0)[..., None]
    patch[:] = np.clip(patch * (1 - soft) + fill * soft, 0, 255).astype(np.uint8)


# One fill pattern per class (with the shape), so the object carries the class signal.
PATTERNS = ("hstripes", "checker", "solid", "dots", "vstripes", "rings", "grid", "crosshatch", "bigdots", "hbands")


def _pattern(name: str, xx: np.ndarray, yy: np.ndarray, period: float) -> np.ndarray:
    phase_x, phase_y = (xx / period) % 1.0, (yy / period) % 1.0
    if name == "hstripes":
        return phase_y < 0.5
    if name == "vstripes":
        return phase_x < 0.5
    if name == "hbands":
        return (yy / (2 * period)) % 1.0 < 0.25
    if name == "checker":
        return (phase_x < 0.5) ^ (phase_y < 0.5)
    if name == "grid":
        return (phase_x < 0.25) | (phase_y < 0.25)
    if name == "dots":
        return (phase_x - 0.5) ** 2 + (phase_y - 0.5) ** 2 < 0.09
    if name == "bigdots":
        return (phase_x - 0.5) ** 2 + (phase_y - 0.5) ** 2 < 0.16
    if name == "rings":
        r = np.hypot(xx - xx.mean(), yy - yy.mean())
        return (r / period) % 1.0 < 0.5
    if name == "crosshatch":
        return (((xx + yy) / period) % 1.0 < 0.25) | (((xx - yy) / period) % 1.0 < 0.25)
    if name == "diamonds":
        return np.abs(phase_x - 0.5) + np.abs(phase_y - 0.5) < 0.3
    if name == "zigzag":  # horizontal bands bent into a triangle wave, symmetric under a mirror
        bend = np.abs(phase_x - 0.5)
        return ((yy / period + bend) % 1.0) < 0.45
    return np.zeros_like(xx, dtype=bool)  # solid


def shape_mask(shape: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A filled ``shape`` (one of SHAPES or EXTRA_SHAPES) stretched to fill a (h, w) box,
    slightly rotated and maybe mirrored: an (h, w) bool array."""
    size = 256
    canvas = np.zeros((size, size), np.uint8)
    c, r = size / 2, size * 0.48

    def polygon(points):
        cv2.fillPoly(canvas, [np.round(np.asarray(points)).astype(np.int32)], 1, cv2.LINE_8)

    def regular(n, radius, phase=0.0):
        t = phase + np.arange(n) * 2 * np.pi / n
        return np.stack([c + radius * np.cos(t), c + radius * np.sin(t)], 1)

    if shape == "disc":
        cv2.circle(canvas, (int(c), int(c)), int(r), 1, -1)
    elif shape == "square":
        polygon([(c - r, c - r), (c + r, c - r), (c + r, c + r), (c - r, c + r)])
    elif shape == "triangle":
        polygon(regular(3, r, -np.pi / 2))
    elif shape == "star":
        outer, inner = regular(5, r, -np.pi / 2), regular(5, r * 0.42, -np.pi / 2 + np.pi / 5)
        polygon(np.stack([outer, inner], 1).reshape(-1, 2))
    elif shape == "cross":
        t = r * 0.33
        polygon([(c - t, c - r), (c + t, c - r), (c + t, c - t), (c + r, c - t), (c + r, c + t), (c + t, c + t),
                 (c + t, c + r), (c - t, c + r), (c - t, c + t), (c - r, c + t), (c - r, c - t), (c - t, c - t)])
    elif shape == "ring":
        cv2.circle(canvas, (int(c), int(c)), int(r), 1, -1)
        cv2.circle(canvas, (int(c), int(c)), int(r * 0.55), 0, -1)
    elif shape == "diamond":
        polygon([(c, c - r), (c + r * 0.7, c), (c, c + r), (c - r * 0.7, c)])
    elif shape == "hexagon":
        polygon(regular(6, r))
    elif shape == "crescent":
        cv2.circle(canvas, (int(c), int(c)), int(r), 1, -1)
        cv2.circle(canvas, (int(c + r * 0.45), int(c - r * 0.1)), int(r * 0.8), 0, -1)
    elif shape == "arrow":
        t = r * 0.25
        polygon([(c - r, c - t), (c + r * 0.2, c - t), (c + r * 0.2, c - r * 0.6), (c + r, c),
                 (c + r * 0.2, c + r * 0.6), (c + r * 0.2, c + t), (c - r, c + t)])
    elif shape == "heart":
        for side in (-1, 1):
            cv2.circle(canvas, (int(c + side * r * 0.48), int(c - r * 0.35)), int(r * 0.52), 1, -1)
        polygon([(c - r * 0.98, c - r * 0.2), (c + r * 0.98, c - r * 0.2), (c, c + r)])
    elif shape == "chevron":
        polygon([(c, c - r * 0.6), (c + r, c + r * 0.6), (c + r * 0.45, c + r * 0.6), (c, c + r * 0.05),
                 (c - r * 0.45, c + r * 0.6), (c - r, c + r * 0.6)])
    elif shape == "hourglass":
        polygon([(c - r * 0.8, c - r), (c + r * 0.8, c - r), (c + r * 0.12, c), (c - r * 0.12, c)])
        polygon([(c - r * 0.12, c), (c + r * 0.12, c), (c + r * 0.8, c + r), (c - r * 0.8, c + r)])
    elif shape == "lshape":
        polygon([(c - r * 0.8, c - r), (c - r * 0.2, c - r), (c - r * 0.2, c + r * 0.4), (c + r * 0.8, c + r * 0.4),
                 (c + r * 0.8, c + r), (c - r * 0.8, c + r)])
    elif shape == "semicircle":
        cv2.ellipse(canvas, (int(c), int(c + r * 0.5)), (int(r), int(r)), 0, 180, 360, 1, -1)
    elif shape == "frame":
        polygon([(c - r, c - r), (c + r, c - r), (c + r, c + r), (c - r, c + r)])
        t = r * 0.5
        cv2.fillPoly(canvas, [np.round(np.array([(c - t, c - t), (c + t, c - t), (c + t, c + t), (c - t, c + t)]))
                              .astype(np.int32)], 0, cv2.LINE_8)
    else:
        raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES + EXTRA_SHAPES}")
    if rng.random() < 0.5 and shape not in ("disc", "ring"):
        canvas = canvas[:, ::-1].copy()
    rotation = cv2.getRotationMatrix2D((c, c), float(rng.uniform(-25, 25)), 1.0)
    canvas = cv2.warpAffine(canvas, rotation, (size, size), flags=cv2.INTER_NEAREST)
    ys, xs = np.nonzero(canvas)
    canvas = canvas[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
