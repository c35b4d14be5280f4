"""The GPU mining path (issue 13): encoded bytes in, boxes out, on the model actor's device.

    python benchmarks/bench_gpu_mine.py [--images 2000] [--arch resnet50] [--scales 288 576]
        [--batch-sizes 64 256 1024] [--compile] [--device cuda] [--parity-only] [--out DIR]
    python benchmarks/bench_gpu_mine.py --options [--images 2000] [--batch-sizes 256]
    python benchmarks/bench_gpu_mine.py --cpu-mode [--sample-cache DIR]

``--options`` (issue 28, with a GPU): at each batch size, for each shape policy
(:data:`dap_ray.localisation.cam.SHAPE_POLICIES`) and each option the static shapes allow
(``cudnn.benchmark``; ``torch.compile`` default, max-autotune, reduce-overhead (CUDA graphs);
torch-tensorrt), the stage's and the network's images/s, the mean images per forward pass,
and what fell back; then the parity section. Printed as ``option_<policy>_<option>`` lines.

``--cpu-mode`` (issue 28, no GPU needed): what does not need a GPU. For each shape policy:
the mean images per forward pass on ImageNet's aspect mix at batch 256 (counted from the
photos' sizes, no network run); CorLoc of the built-in sample's pseudo boxes with the
embedded default's classifier (trained on first use, about 4 minutes, cached); the CAMs and
top boxes of ``buckets`` against ``exact`` on the photos (Pearson correlation per image,
top-box IoU), ImageNet's mix and any aspect from 1:2 to 2:1; and the CPU time per image of
everything the model actor does besides the network. Ends with one line per policy:
``shapes=buckets images_per_forward=201.3 corloc=0.318 corloc_exact=0.320``.

Photos: made from the real photographs that installed packages ship (scikit-learn,
matplotlib, scikit-image; the sources found are listed), cropped at ImageNet's usual aspects
(:data:`IMAGENET_ASPECTS`), resized to a long side of about 500 px and saved as JPEGs.
Prints, each section also saved to ``--out/bench_gpu_mine.json`` as soon as it is measured:

1. ``object_store``: bytes per image that cross Ray's object store into the model actors:
   the old path's (decode_and_resize's Arrow rows: pixels at every scale) against the new
   one's (the read_shard records: the encoded bytes), on the photos and the built-in sample;
2. ``cpu_decode_resize``: CPU time per image of the old path's decode-and-resize tasks (one
   thread), and the cores a GPU at 2,000 images/s would need for them;
3. ``speed_batch_N`` on ``--device``, per batch size: images/s of the model actor's stage
   (:class:`EncodedCamBoxStage`, Arrow batches in and out, as Ray Data calls it, Ray's own
   overhead excluded) on its first pass (cuDNN meets each input shape for the first time)
   and warm; of a bare in-process loop, JPEG bytes to boxes through the same library
   functions; of the CAM network alone on images already decoded and resized on the device;
   the mean images per forward pass (one padded shape each) and the CPU time the process
   spent per image (its thread spinning on the GPU included). ``mixed_shapes``: the same at
   the best batch size on photos of any aspect from 1:2 to 2:1. ``compiled`` (``--compile``):
   the stage with ``torch.compile``, its first pass (compilation) apart;
4. ``parity``: the device decoder's pixels against PIL's, every decoder route (CMYK,
   progressive, grayscale, PNG, truncated, overwritten scan, EXIF-rotated), and the CAMs of
   the device path against the CPU path's (Pearson correlation per image) with their boxes.

The classifier has random weights (seeded): the speed of a ResNet does not depend on its
weights, and nothing is downloaded.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dap_ray.data.device_decode import decode_on_device  # noqa: E402
from dap_ray.data.images import decode_image  # noqa: E402
from dap_ray.evaluation.localisation import box_iou  # noqa: E402
from dap_ray.localisation.boxes import BoxConfig, cam_to_boxes_batch  # noqa: E402
from dap_ray.localisation.cam import (  # noqa: E402
    SHAPE_POLICIES,
    CamExtractor,
    forward_sizes,
    plan_shape,
    resize_tensor,
    resized_size,
)
from dap_ray.localisation.stages import EncodedCamBoxStage, decode_and_resize  # noqa: E402
from dap_ray.models.classifiers import load_classifier  # noqa: E402


def source_photos() -> list[str]:
    """Colour photographs shipped inside installed packages, at least 300 px a side."""
    import importlib.util

    found = []
    for package, pattern in (("sklearn", "datasets/images/*.jpg"), ("matplotlib", "mpl-data/sample_data/*.jpg"),
                             ("skimage", "data/*.png"), ("skimage", "data/*.jpg")):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for path in sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], pattern))):
            try:
                with Image.open(path) as image:
                    if image.mode == "RGB" and min(image.size) >= 300:
                        found.append(path)
            except OSError:
                continue
    if not found:
        raise SystemExit("no photographs found in installed packages (scikit-learn, matplotlib, scikit-image)")
    return found


# ImageNet-1K's train images: about three quarters are 500 px wide or high at 4:3 or 3:4
# (500x375, 375x500), most of the rest 3:2, 2:3 or square; the "mixed" mix draws any
# aspect from 1:2 to 2:1, as web-crawled data has.
IMAGENET_ASPECTS = ((4 / 3, 0.55), (3 / 4, 0.2), (3 / 2, 0.1), (2 / 3, 0.05), (1.0, 0.05))


def make_photo(args: tuple[str, int, str]) -> bytes:
    """One JPEG: a crop of a source photo at an aspect drawn from ``mix``, resized so that its
    long side is 500 px (ImageNet's usual) or, one time in four, 300 to 800 px."""
    path, seed, mix = args
    rng = np.random.default_rng(seed)
    with Image.open(path) as source:
        image = source.convert("RGB")
    width, height = image.size
    if mix == "imagenet" and rng.random() < 0.95:
        aspects, weights = zip(*IMAGENET_ASPECTS)
        aspect = float(rng.choice(aspects, p=np.array(weights) / sum(weights)))
    else:
        aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    fit = min(width, height * aspect)  # the widest crop of this aspect inside the source
    crop_w = fit * np.sqrt(rng.uniform(0.4, 1.0))
    crop_h = crop_w / aspect
    x, y = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
    long_side = 500 if rng.random() < 0.75 else int(rng.integers(300, 800))
    out_w, out_h = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    image = image.resize((out_w, out_h), Image.BILINEAR, box=(x, y, x + crop_w, y + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(75, 96)))
    return buffer.getvalue()


def make_photos(count: int, sources: list[str], mix: str = "imagenet") -> list[bytes]:
    jobs = [(sources[i % len(sources)], i, mix) for i in range(count)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(make_photo, jobs, chunksize=32))


def records(datas: list[bytes], labels: list[int] | None = None) -> pa.Table:
    """Rows as :func:`dap_ray.data.sources.read_shard` yields them."""
    n = len(datas)
    labels = labels if labels is not None else [1] * n
    return pa.table({"image_id": [f"photo_{i:06d}.jpg" for i in range(n)], "label": labels, "data": datas,
                     "error": [""] * n, "retry": [False] * n, "shard": ["bench#0"] * n, "shard_total": [n] * n})


def object_store_bytes(datas: list[bytes], scales: tuple[int, ...]) -> dict:
    """Arrow bytes per image into the model actors, old path (pixels) and new (encoded)."""
    encoded = records(datas)
    pixels = decode_and_resize(encoded, scales)
    n = len(datas)
    return {"images": n, "encoded_bytes_per_image": round(sum(map(len, datas)) / n),
            "new_path_bytes_per_image": round(encoded.nbytes / n), "old_path_bytes_per_image": round(pixels.nbytes / n),
            "new_over_encoded": round(encoded.nbytes / sum(map(len, datas)), 3),
            "old_over_new": round(pixels.nbytes / encoded.nbytes, 2)}


def cpu_decode_seconds(datas: list[bytes], scales: tuple[int, ...]) -> float:
    """CPU seconds per image of the old path's decode_and_resize, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decode_and_resize(records(datas[:8]), scales)  # warm-up
        start = time.process_time()
        for i in range(0, len(datas), 16):
            decode_and_resize(records(datas[i : i + 16]), scales)
        return (time.process_time() - start) / len(datas)
    finally:
        torch.set_num_threads(threads)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def network_only(extractor: CamExtractor, resized: list, labels: list[int], batch: int) -> float:
    """Images/s of the CAM network on images already resized on the device."""
    extractor.from_tensors(resized[:batch], labels[:batch])
    sync(extractor.device)
    start = time.perf_counter()
    for i in range(0, len(resized), batch):
        extractor.from_tensors(resized[i : i + batch], labels[i : i + batch])
    sync(extractor.device)
    return len(resized) / (time.perf_counter() - start)


def bare_loop(extractor: CamExtractor, datas: list[bytes], labels: list[int], batch: int, config: BoxConfig) -> float:
    """Images/s of JPEG bytes to boxes in a plain loop over the library's functions."""
    def run(chunk_datas, chunk_labels):
        images, _, _ = decode_on_device(chunk_datas, extractor.device)
        resized = [[resize_tensor(image, s) for s in extractor.scales] for image in images]
        cams = extractor.from_tensors(resized, chunk_labels)
        cam_to_boxes_batch(cams, [(image.shape[2], image.shape[1]) for image in images], config)

    run(datas[:batch], labels[:batch])
    sync(extractor.device)
    start = time.perf_counter()
    for i in range(0, len(datas), batch):
        run(datas[i : i + batch], labels[i : i + batch])
    sync(extractor.device)
    return len(datas) / (time.perf_counter() - start)


def stage_pass(stage: EncodedCamBoxStage, table: pa.Table, batch: int) -> tuple[float, float, int]:
    """(images/s, CPU seconds per image of this process, boxes) of the actor's stage over ``table``."""
    boxes = 0
    sync(stage.extractor.device)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, table.num_rows, batch):
        out = stage(table.slice(i, batch))
        boxes += sum(len(b) for b in out.column("boxes").to_pylist())
    sync(stage.extractor.device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return table.num_rows / wall, cpu / table.num_rows, boxes


def awkward_files(photo: Image.Image) -> dict[str, bytes]:
    def save(image, fmt="JPEG", **options):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6
    baseline = save(photo, quality=90)
    return {"baseline": baseline, "progressive": save(photo, progressive=True), "gray": save(photo.convert("L")),
            "cmyk": save(photo.convert("CMYK")), "png": save(photo, "PNG"), "exif_rotated": save(photo, exif=exif),
            "subsampling_444": save(photo, subsampling=0), "truncated": baseline[: len(baseline) // 2],
            "corrupt_scan": _scramble(baseline), "text": b"not an image at all"}


def _scramble(data: bytes) -> bytes:
    """``data`` with its middle third replaced by random bytes: the header parses, the scan does not."""
    third = len(data) // 3
    noise = np.random.default_rng(0).integers(0, 256, third, dtype=np.uint8).tobytes()
    return data[:third] + noise + data[2 * third :]


def parity(device: torch.device, datas: list[bytes], model: torch.nn.Module, scales, config: BoxConfig) -> dict:
    """The device path against the CPU path: decoded pixels, routes, CAMs and boxes."""
    report: dict = {}
    images, _, decoders = decode_on_device(datas, device)
    diffs = [np.abs(image.cpu().permute(1, 2, 0).numpy().astype(np.int16) - decode_image(data).astype(np.int16))
             for image, data in zip(images, datas)]
    report["pixels_vs_pil"] = {"images": len(datas), "decoded_on_device": decoders.count("device"),
                               "max_abs_diff": int(max(d.max() for d in diffs)),
                               "mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 4),
                               "share_of_pixels_equal": round(float(np.mean([(d == 0).mean() for d in diffs])), 4)}
    photo = Image.open(io.BytesIO(datas[0])).convert("RGB")
    routes = {}
    for name, data in awkward_files(photo).items():
        (image,), (error,), (decoder,) = decode_on_device([data], device)
        try:
            expected, expected_error = decode_image(data), ""
        except Exception as exc:  # noqa: BLE001 - recorded, compared below
            expected, expected_error = None, str(exc)
        entry = {"decoder": decoder, "error": error[:80], "same_error_as_pil": error == expected_error}
        if image is not None and expected is not None:
            got = image.cpu().permute(1, 2, 0).numpy()
            entry["same_shape"] = got.shape == expected.shape
            if got.shape == expected.shape:
                entry["max_abs_diff_vs_pil"] = int(np.abs(got.astype(np.int16) - expected.astype(np.int16)).max())
        routes[name] = entry
    report["routes"] = routes
    labels = [int(i % 1000) for i in range(len(datas))]
    on_device = CamExtractor(model, scales=scales, device=device, batch_size=16)
    on_cpu = CamExtractor(model, scales=scales, device="cpu", batch_size=16)
    resized_device = [[resize_tensor(image, s) for s in scales] for image in images]
    cams_device = on_device.from_tensors(resized_device, labels)
    arrays = [decode_image(data) for data in datas]
    resized_cpu = [[resize_tensor(torch.from_numpy(a).permute(2, 0, 1), s) for s in scales] for a in arrays]
    cams_cpu = on_cpu.from_tensors(resized_cpu, labels)
    correlations = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(cams_device, cams_cpu)]
    sizes = [(a.shape[1], a.shape[0]) for a in arrays]
    boxes_device = cam_to_boxes_batch(cams_device, sizes, config)
    boxes_cpu = cam_to_boxes_batch(cams_cpu, sizes, config)
    same_count = [len(a) == len(b) for (a, _), (b, _) in zip(boxes_device, boxes_cpu)]
    top_iou = []
    for (a, _), (b, _) in zip(boxes_device, boxes_cpu):
        if len(a) and len(b):
            top_iou.append(float(box_iou(a[:1], b[:1])[0, 0]))
    report["cams_vs_cpu"] = {"images": len(datas), "min_correlation": round(min(correlations), 5),
                             "mean_correlation": round(float(np.mean(correlations)), 5),
                             "same_box_count": round(float(np.mean(same_count)), 3),
                             "top_box_iou_mean": round(float(np.mean(top_iou)), 4) if top_iou else None,
                             "top_box_iou_min": round(float(np.min(top_iou)), 4) if top_iou else None}
    return report


def measure(model, datas, labels, table, batch, scales, device, config, arch, **options) -> dict:
    """One batch size: the stage's first pass (cuDNN choosing kernels for each new input
    shape, or compilation), then warm passes of the stage, the bare loop and the network
    alone. ``options``: :class:`CamExtractor`'s (shapes, compile, cudnn_benchmark)."""
    extractor = CamExtractor(model, scales=scales, device=device, batch_size=batch, **options)
    sizes: list[int] = []
    forward = extractor._forward

    def counted(images, *rest):
        sizes.append(len(images))
        return forward(images, *rest)

    extractor._forward = counted
    stage = EncodedCamBoxStage(arch, None, 1000, scales, True, config, batch_size=batch, device=str(device))
    stage.extractor = extractor  # the same random weights
    cold, _, _ = stage_pass(stage, table, batch)
    forwards = len(sizes)
    rate, cpu, boxes = stage_pass(stage, table, batch)
    bare = bare_loop(extractor, datas, labels, batch, config)
    images, _, _ = decode_on_device(datas, device)
    resized = [[resize_tensor(image, s) for s in scales] for image in images]
    network = network_only(extractor, resized, labels, batch)
    del images, resized
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"stage_first_pass_images_per_s": round(cold, 1), "stage_images_per_s": round(rate, 1),
            "bare_loop_images_per_s": round(bare, 1), "network_only_images_per_s": round(network, 1),
            "stage_over_bare_loop": round(rate / bare, 3), "stage_over_network_only": round(rate / network, 3),
            "forwards_per_pass": forwards, "mean_images_per_forward": round(len(datas) * len(scales) / forwards, 1),
            "stage_cpu_ms_per_image": round(cpu * 1000, 3), "stage_process_cores_busy": round(cpu * rate, 2),
            "boxes_per_image": round(boxes / len(datas), 2), "compile": extractor.compile_mode,
            "fell_back": extractor.compile_note}


# The options the static shapes allow (issue 28, item 2), each as CamExtractor's arguments.
# max-autotune last: it may spend minutes per shape choosing kernels.
OPTIONS = {"eager": {}, "cudnn_benchmark": {"cudnn_benchmark": True}, "compile": {"compile": "default"},
           "cuda_graphs": {"compile": "reduce-overhead"}, "tensorrt": {"compile": "tensorrt"},
           "max_autotune": {"compile": "max-autotune"}}


def imagenet_forwards(sizes: list[tuple[int, int]], scales: tuple[int, ...], batch: int, policy: str) -> dict:
    """Forward passes of ``policy`` for images of ``sizes`` ((W, H)) in batches of ``batch``,
    counted without running the network; only whole batches, as a long run has them."""
    counts: list[int] = []
    for start in range(0, len(sizes) - batch + 1, batch):
        chunk = sizes[start : start + batch]
        for scale in scales:
            resized = [resized_size(w, h, scale)[::-1] for w, h in chunk]
            counts += forward_sizes(resized, batch, policy=policy)
    return {"policy": policy, "batch": batch, "images": len(sizes) // batch * batch, "forwards": len(counts),
            "mean_images_per_forward": round(float(np.mean(counts)), 1),
            "share_of_images_in_passes_of_128_or_more": round(sum(c for c in counts if c >= 128) / sum(counts), 3)}


def sample_corloc(cache: str | None, policy: str) -> dict:
    """CorLoc (and the rest of :func:`localisation_quality`) of the built-in sample's pseudo
    boxes with the embedded default's classifier and scales, every image, under ``policy``."""
    from dap_ray.evaluation.localisation import load_coco_boxes, localisation_quality
    from dap_ray.steps.embedded import SAMPLE_SCALES, sample_classifier, sample_dataset

    sample, run = sample_dataset(cache), sample_classifier(cache)
    meta = json.loads((run / "meta.json").read_text())
    model = load_classifier(meta["arch"], weights=run / "classifier.pt", num_classes=meta["num_classes"])
    truth, sizes = load_coco_boxes(sample / "gt_boxes.json")
    classes = (sample / "classes.txt").read_text().split()
    keys = sorted(truth)
    labels = [classes.index(key.split("/")[0]) for key in keys]
    images = [decode_image((sample / "images" / key).read_bytes()) for key in keys]
    extractor = CamExtractor(model, scales=SAMPLE_SCALES, device="cpu", batch_size=256, shapes=policy)
    boxes = dict(zip(keys, boxes_as_mined(extractor, images, labels, BoxConfig(scale=max(SAMPLE_SCALES)))))
    by_aspect: dict[str, list[str]] = {}
    for key, image in zip(keys, images):
        height, width = image.shape[:2]
        by_aspect.setdefault(f"{width / height:.2f}", []).append(key)
    corloc_by_aspect = {aspect: round(localisation_quality({k: boxes[k] for k in members},
                                                           {k: truth[k] for k in members})["corloc"], 4)
                        for aspect, members in sorted(by_aspect.items())}
    return {"images": len(keys), **localisation_quality(boxes, truth), "corloc_by_aspect_w_over_h": corloc_by_aspect}


def boxes_as_mined(extractor: CamExtractor, images: list[np.ndarray], labels: list[int], config: BoxConfig) -> list:
    """Boxes of (H, W, 3) uint8 ``images`` as the model actor draws them: from each map on the
    grid the network saw, stretched back (:meth:`CamExtractor.from_tensors_native`)."""
    tensors = [[resize_tensor(torch.from_numpy(image).permute(2, 0, 1), s) for s in extractor.scales]
               for image in images]
    cams, frames = extractor.from_tensors_native(tensors, labels)
    return cam_to_boxes_batch(cams, [(image.shape[1], image.shape[0]) for image in images], config, frames)


def policy_parity(model, datas: list[bytes], scales, config: BoxConfig, policy: str) -> dict:
    """``policy``'s CAMs (on the exact path's grid) and top boxes (as mined) against the exact
    path's, on the CPU, per image."""
    arrays = [decode_image(d) for d in datas]
    labels = [int(i % 1000) for i in range(len(datas))]
    exact_extractor = CamExtractor(model, scales=scales, device="cpu", batch_size=64)
    extractor = CamExtractor(model, scales=scales, device="cpu", batch_size=64, shapes=policy)
    exact, other = exact_extractor(arrays, labels), extractor(arrays, labels)
    sizes = [(a.shape[1], a.shape[0]) for a in arrays]
    correlations = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(exact, other)]
    ious = [float(box_iou(a[:1], b[:1])[0, 0]) if len(a) and len(b) else 0.0
            for (a, _), (b, _) in zip(cam_to_boxes_batch(exact, sizes, config),
                                      boxes_as_mined(extractor, arrays, labels, config))]
    largest = [resized_size(w, h, max(scales))[::-1] for w, h in sizes]
    fits = [plan_shape(h, w, policy=policy)[1] == (h, w) for h, w in largest]  # padded only, not squeezed
    return {"images": len(datas), "mean_correlation": round(float(np.mean(correlations)), 4),
            "min_correlation": round(min(correlations), 4),
            "top_box_iou_mean": round(float(np.mean(ious)), 4), "top_box_iou_min": round(min(ious), 4),
            "top_box_iou_mean_padded": round(float(np.mean([i for i, f in zip(ious, fits) if f] or [np.nan])), 4),
            "top_box_iou_mean_squeezed": round(float(np.mean([i for i, f in zip(ious, fits) if not f] or [np.nan])),
                                               4),
            "squeezed_images": fits.count(False)}


def actor_cpu_besides_network(model, datas: list[bytes], scales, config: BoxConfig, arch: str, policy: str,
                              batch: int) -> dict:
    """CPU seconds per image the model actor's stage spends besides the network's forward
    passes (decoding, resizing, placing, the CAMs' arithmetic, boxes, Arrow), on the CPU."""
    stage = EncodedCamBoxStage(arch, None, 1000, scales, True, config, batch_size=batch, device="cpu")
    stage.extractor = CamExtractor(model, scales=scales, device="cpu", batch_size=batch, shapes=policy)
    network = [0.0]
    features = stage.extractor._features

    def timed(x):
        start = time.process_time()
        try:
            return features(x)
        finally:
            network[0] += time.process_time() - start

    stage.extractor._features = timed
    table = records(datas)
    stage(table.slice(0, min(batch, 8)))  # warm-up: the boxes' compiled loop, first allocations
    network[0] = 0.0
    start = time.process_time()
    for i in range(0, table.num_rows, batch):
        stage(table.slice(i, batch))
    total = time.process_time() - start
    return {"images": len(datas), "cpu_ms_per_image_total": round(total / len(datas) * 1000, 2),
            "cpu_ms_per_image_network": round(network[0] / len(datas) * 1000, 2),
            "cpu_ms_per_image_besides_network": round((total - network[0]) / len(datas) * 1000, 2)}


def cpu_mode(args, save) -> None:
    """Issue 28's figures that need no GPU (see the module's docstring)."""
    scales = tuple(sorted(args.scales))
    config = BoxConfig(scale=max(scales))
    sources = source_photos()
    photos = make_photos(args.images, sources)
    sizes = [Image.open(io.BytesIO(d)).size for d in photos]
    forwards = {policy: imagenet_forwards(sizes, scales, 256, policy) for policy in SHAPE_POLICIES}
    save("forwards", forwards)
    corloc = {policy: sample_corloc(args.sample_cache, policy) for policy in SHAPE_POLICIES}
    save("sample_corloc", corloc)
    torch.manual_seed(0)
    model = load_classifier(args.arch, None, num_classes=1000)
    count = args.parity_images
    mixed = make_photos(count, sources, "mixed")
    save("photo_parity", {"imagenet_mix": policy_parity(model, photos[:count], scales, config, "buckets"),
                          "any_aspect": policy_parity(model, mixed, scales, config, "buckets"),
                          "classifier": f"{args.arch}, random weights (seeded)"})
    cpu = {policy: actor_cpu_besides_network(model, photos[:count], scales, config, args.arch, policy, count)
           for policy in SHAPE_POLICIES}
    save("actor_cpu", cpu)
    for policy in SHAPE_POLICIES:
        print(f"shapes={policy} images_per_forward={forwards[policy]['mean_images_per_forward']}"
              f" corloc={corloc[policy]['corloc']:.3f} corloc_exact={corloc['exact']['corloc']:.3f}"
              f" cpu_ms_besides_network={cpu[policy]['cpu_ms_per_image_besides_network']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--scales", type=int, nargs="+", default=[288, 576])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile's CAM network")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --cpu-mode)")
    parser.add_argument("--parity-images", type=int, default=16)
    parser.add_argument("--parity-only", action="store_true", help="only the photos and section 4")
    parser.add_argument("--compile-after-s", type=float, default=420,
                        help="skip the compiled run when the others took longer than this")
    parser.add_argument("--out", default=os.environ.get("OUT") or tempfile.gettempdir())
    parser.add_argument("--cpu-mode", action="store_true",
                        help="only what needs no GPU: forwards per shape policy, parity, the actor's CPU time")
    parser.add_argument("--sample-cache", default=None,
                        help="--cpu-mode: the embedded default's cache (default: $DAP_RAY_CACHE or ~/.cache/dap_ray)")
    parser.add_argument("--options", action="store_true",
                        help="each shape policy with each option of OPTIONS at each batch size, then parity")
    parser.add_argument("--options-budget-s", type=float, default=420,
                        help="--options: skip the options left once this many seconds have passed")
    args = parser.parse_args()
    if args.cpu_mode and args.device not in (None, "cpu"):
        parser.error("--cpu-mode runs on the CPU; leave --device out or give --device cpu")
    began = time.perf_counter()
    scales = tuple(sorted(args.scales))
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not args.cpu_mode else "cpu")
    device = torch.device(args.device)
    config = BoxConfig(scale=max(scales))
    results: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "torch": torch.__version__,
                     "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                     "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    out_path = Path(args.out) / "bench_gpu_mine.json"

    def save(section: str, value) -> None:
        results[section] = value
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=2))
        print(f"{section}: {json.dumps(value)}", flush=True)

    import torchvision
    results["torchvision"] = torchvision.__version__
    if args.cpu_mode:
        cpu_mode(args, save)
        print(f"results: {out_path}")
        return
    sources = source_photos()
    start = time.perf_counter()
    datas = make_photos(args.images, sources)
    sizes = [Image.open(io.BytesIO(d)).size for d in datas[:500]]
    save("photos", {"sources": [str(Path(s).relative_to(Path(s).parents[2])) for s in sources], "count": len(datas),
                    "mean_bytes": round(float(np.mean([len(d) for d in datas]))),
                    "mean_size": [round(float(np.mean([s[k] for s in sizes]))) for k in (0, 1)],
                    "made_in_s": round(time.perf_counter() - start, 1)})

    if args.parity_only:
        torch.manual_seed(0)
        save("parity", parity(device, datas[: args.parity_images], load_classifier(args.arch, None, num_classes=1000),
                              scales, config))
        return

    from dap_ray.data.sample import SampleConfig, make_sample_dataset
    with tempfile.TemporaryDirectory() as tmp:
        sample = make_sample_dataset(Path(tmp) / "sample", SampleConfig(num_images=96))
        sample_datas = [p.read_bytes() for p in sorted((sample / "images").rglob("*.jpg"))]
    save("object_store", {"photos": object_store_bytes(datas[:256], scales),
                          "sample": object_store_bytes(sample_datas, scales)})

    per_image = cpu_decode_seconds(datas[:200], scales)
    save("cpu_decode_resize", {"cpu_ms_per_image_one_thread": round(per_image * 1000, 2),
                               "cores_per_gpu_at_2000_images_per_s": round(per_image * 2000, 1)})

    torch.manual_seed(0)
    model = load_classifier(args.arch, None, num_classes=1000)
    labels = [i % 1000 for i in range(len(datas))]
    table = records(datas, labels)
    if args.options:
        for batch in args.batch_sizes:
            for policy in SHAPE_POLICIES:
                for name, options in OPTIONS.items():
                    if policy == "exact" and name != "eager":
                        continue  # the options are for static shapes; exact's many shapes recompile each
                    key = f"option_{policy}_{name}_batch_{batch}"
                    if time.perf_counter() - began > args.options_budget_s:
                        save(key, f"skipped: {time.perf_counter() - began:.0f} s had passed (--options-budget-s)")
                        continue
                    benchmark = torch.backends.cudnn.benchmark
                    try:
                        save(key, measure(model, datas, labels, table, batch, scales, device, config, args.arch,
                                          shapes=policy, **options))
                    finally:  # each option alone: no autotuner left on, no compiled graphs kept
                        torch.backends.cudnn.benchmark = benchmark
                        torch._dynamo.reset()
        save("parity", parity(device, datas[: args.parity_images], model, scales, config))
        print(f"results: {out_path}")
        return
    speed: dict = {}
    for batch in args.batch_sizes:
        speed[batch] = measure(model, datas, labels, table, batch, scales, device, config, args.arch)
        save(f"speed_batch_{batch}", speed[batch])
    best = max(speed, key=lambda b: speed[b]["stage_images_per_s"])
    mixed = make_photos(len(datas), sources, "mixed")
    save("mixed_shapes", {"batch": best, **measure(model, mixed, labels, records(mixed, labels), best, scales, device,
                                                   config, args.arch)})

    save("parity", parity(device, datas[: args.parity_images], model, scales, config))

    if args.compile and time.perf_counter() - began > args.compile_after_s:
        save("compiled", f"skipped: {time.perf_counter() - began:.0f} s had passed (--compile-after-s)")
    elif args.compile:
        batch = best
        extractor = CamExtractor(model, scales=scales, device=device, batch_size=batch, compile=True)
        stage = EncodedCamBoxStage(args.arch, None, 1000, scales, True, config, batch_size=batch, device=str(device))
        stage.extractor = extractor
        start = time.perf_counter()
        first, _, _ = stage_pass(stage, table, batch)  # compiles for the shapes met
        compile_pass = time.perf_counter() - start
        rate, cpu, _ = stage_pass(stage, table, batch)
        save("compiled", {"batch": batch, "first_pass_s_with_compilation": round(compile_pass, 1),
                          "first_pass_images_per_s": round(first, 1), "stage_images_per_s": round(rate, 1),
                          "stage_gain_over_eager": round(rate / speed[batch]["stage_images_per_s"], 3)})

    print(f"results: {out_path}")


if __name__ == "__main__":
    main()
