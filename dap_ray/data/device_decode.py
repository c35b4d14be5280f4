"""Decoding encoded images on the model's device: JPEGs in batches with nvJPEG on CUDA
(libjpeg-turbo through the same call on CPU), everything else through :func:`decode_image`.

The GPU mining path sends encoded bytes, not pixels, to its model actors
(:class:`dap_ray.localisation.stages.EncodedCamBoxStage`); this is where they become
(3, H, W) uint8 RGB tensors. The result is the image :func:`decode_image` gives (upright by
its EXIF orientation, RGB), so that boxes and image sizes are those of the CPU path: on CPU
the pixels are the same to the bit (both libjpeg-turbo); nvJPEG's IDCT and chroma upsampling
differ from libjpeg's by a few levels in some pixels.

Routing, from the header alone (PIL reads it without decoding): baseline or progressive
JPEGs in YCbCr or grayscale go to the device decoder. To :func:`decode_image` go CMYK and
YCCK JPEGs, which PIL turns into RGB its own way, and JPEGs whose Adobe marker says they
hold RGB itself (nvJPEG's output for either was not checked against PIL's); JPEGs whose
markers are damaged or cut short (:func:`jpeg_structure_is_sound`: nvJPEG would decode them
without a word); and every other format (PNG, WebP, ...). A device batch that fails is
retried one image at a time, and an image the device decoder refuses is decoded by
:func:`decode_image`, whose :class:`BadImageError` names the fault; so nothing is lost and a
corrupt file is an error, never a crash.
"""

from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dap_ray.data.images import MAX_IMAGE_PIXELS, BadImageError, decode_image, exif_orientation

__all__ = ["DEVICE_JPEG_MODES", "decode_on_device", "jpeg_structure_is_sound", "orient"]

# JPEG colour modes (as PIL reads them from the header) sent to the device decoder; CMYK and
# YCCK go to PIL.
DEVICE_JPEG_MODES = frozenset({"RGB", "L"})


def decode_on_device(
    datas: Sequence[bytes], device: str | torch.device, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[list[torch.Tensor | None], list[str], list[str]]:
    """Decode ``datas`` to upright RGB images on ``device``.

    Returns three lists as long as ``datas``: the images ((3, H, W) uint8 tensors on
    ``device``; None where decoding failed), the errors (``""`` or the reason, as
    :func:`decode_image` words it) and which decoder made each image (``"device"``,
    ``"cpu"``, or ``""`` on failure).
    """
    device = torch.device(device)
    images: list[torch.Tensor | None] = [None] * len(datas)
    errors = [""] * len(datas)
    decoders = [""] * len(datas)
    on_device: list[int] = []
    orientations: dict[int, int] = {}
    for i, data in enumerate(datas):
        orientation = _device_jpeg_orientation(data, max_pixels)
        if orientation is None:
            images[i], errors[i], decoders[i] = _decode_on_cpu(data, device, max_pixels)
        else:
            on_device.append(i)
            orientations[i] = orientation
    for i, image in zip(on_device, _decode_jpegs([datas[i] for i in on_device], device)):
        if image is None:  # refused by the device decoder: PIL decodes it or names the fault
            images[i], errors[i], decoders[i] = _decode_on_cpu(datas[i], device, max_pixels)
        else:
            images[i], decoders[i] = orient(image, orientations[i]), "device"
    return images, errors, decoders


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image turned upright by its EXIF ``orientation`` (1 to 8), as PIL's
    ``ImageOps.exif_transpose`` turns it; other values leave it as it is."""
    if orientation == 2:  # mirrored left-right
        return image.flip(-1)
    if orientation == 3:  # upside down
        return image.flip(-1, -2)
    if orientation == 4:  # mirrored top-bottom
        return image.flip(-2)
    if orientation == 5:  # PIL's TRANSPOSE: rows become columns
        return image.transpose(-1, -2)
    if orientation == 6:  # PIL's ROTATE_270: a quarter turn clockwise
        return image.transpose(-1, -2).flip(-1)
    if orientation == 7:  # PIL's TRANSVERSE
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:  # PIL's ROTATE_90: a quarter turn anticlockwise
        return image.transpose(-1, -2).flip(-2)
    return image


def _device_jpeg_orientation(data: bytes, max_pixels: int) -> int | None:
    """The EXIF orientation of a JPEG that the device decoder takes, or None when
    :func:`decode_image` must decode ``data`` (another format or colour mode, an unreadable
    header, too many pixels, a damaged structure: it words the error)."""
    if not data.startswith(b"\xff\xd8") or not jpeg_structure_is_sound(data):
        return None
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            if header.format != "JPEG" or header.mode not in DEVICE_JPEG_MODES or not 0 < width * height <= max_pixels:
                return None
            if header.mode == "RGB" and header.info.get("adobe_transform") == 0:
                return None  # stored as RGB, not YCbCr (Adobe's marker says so): not checked on nvJPEG
            return exif_orientation(header)
    except Exception:  # noqa: BLE001 - any header fault is decode_image's to word
        return None


# Bytes that may follow 0xFF after the first scan starts: a stuffed zero, restart markers,
# fill bytes, EOI, and the segments that progressive and multi-scan JPEGs put between scans
# (DHT, DAC, DQT, DNL, DRI, SOS, APPn, COM).
_AFTER_FF_IN_SCANS = np.zeros(256, bool)
_AFTER_FF_IN_SCANS[[0x00, 0xFF, 0xD9, 0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xDA, 0xFE, *range(0xD0, 0xD8),
                    *range(0xE0, 0xF0)]] = True


def jpeg_structure_is_sound(data: bytes) -> bool:
    """Whether a JPEG's markers are whole: its header segments chain up to the first scan, no
    0xFF inside the scans starts anything a scan may not hold, and it ends with EOI.

    nvJPEG decodes truncated files and scans with bytes overwritten without a word (gray or
    garbled pixels) where libjpeg and PIL refuse them; such files go to :func:`decode_image`,
    which names the fault. Flipped bits that leave the markers whole are not caught here.
    A JPEG with bytes after its EOI (some cameras append data) is sent to PIL too.
    """
    size = len(data)
    position = 2
    while True:  # header segments: 0xFF, marker, 2-byte length
        while position < size and data[position] == 0xFF and position + 1 < size and data[position + 1] == 0xFF:
            position += 1  # fill bytes
        if position + 4 > size or data[position] != 0xFF:
            return False
        marker = data[position + 1]
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        if length < 2:
            return False
        position += 2 + length
        if marker == 0xDA:
            break
    if position > size - 2 or not data.endswith(b"\xff\xd9"):
        return False
    scans = np.frombuffer(data, np.uint8, count=size - 2 - position, offset=position)
    follows = np.flatnonzero(scans[:-1] == 0xFF) + 1
    return bool(_AFTER_FF_IN_SCANS[scans[follows]].all() and (not scans.size or scans[-1] != 0xFF))


def _decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """JPEGs decoded on ``device`` in one batch; when the batch fails, one at a time, None
    for each the decoder refuses."""
    if not datas:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec, which is not a dependency.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for data in encoded:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def _decode_on_cpu(data: bytes, device: torch.device, max_pixels: int) -> tuple[torch.Tensor | None, str, str]:
    try:
        array = decode_image(data, max_pixels)
    except BadImageError as exc:
        return None, str(exc), ""
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if device.type == "cuda":
        image = image.pin_memory().to(device, non_blocking=True)
    return image, "", "cpu"
