"""The GPU mining path's code on CPU: encoded bytes in, the CPU path's images and boxes out."""

import io
import struct

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from dap_ray.data.device_decode import decode_on_device, jpeg_structure_is_sound, orient
from dap_ray.data.images import BadImageError, decode_image
from dap_ray.localisation.boxes import BoxConfig
from dap_ray.localisation.stages import CamBoxStage, EncodedCamBoxStage, decode_and_resize
from tests.helpers import BAD_ERRORS, bad_files, encode, exif_rotated_photo, photo

SCALES = (32, 64)


def records(named: dict[str, bytes], labels: list[int] | None = None) -> pa.Table:
    labels = labels if labels is not None else [1] * len(named)
    return pa.table({"image_id": list(named), "label": labels, "data": list(named.values()),
                     "error": [""] * len(named), "retry": [False] * len(named),
                     "shard": ["s"] * len(named), "shard_total": [len(named)] * len(named)})


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def awkward_files(rng) -> dict[str, bytes]:
    """Every route through the decoder: name -> bytes."""
    rgb = photo(rng, 30, 44)
    return {
        **bad_files(rng),
        "baseline.jpg": jpeg(rgb, quality=90),
        "progressive.jpg": jpeg(rgb, progressive=True),
        "gray.jpg": jpeg(rgb.convert("L")),
        "subsampled.jpg": jpeg(rgb, subsampling=2),
        "phone.jpg": exif_rotated_photo(rng, 30, 44),
        "photo.png": encode(rgb),
        "photo.webp": encode(rgb, "WEBP"),
        "header_only.jpg": jpeg(rgb)[:200],  # a JPEG header that parses, then no image data
        "scrambled.jpg": scrambled(jpeg(photo(rng, 60, 80), quality=95)),
        "trailing.jpg": jpeg(rgb) + b"appended by a camera",
        "stored_as_rgb.jpg": jpeg(rgb, keep_rgb=True),  # Adobe marker, transform 0: not YCbCr
        "orientation_as_text.jpg": exif_jpeg(rgb, (0x0112, 2, 2, b"6\0")),  # not an orientation: upright
        "bad_exif_turned.jpg": exif_jpeg(rgb, ORIENTATION_6, RESOLUTION_AS_TEXT),
        "bad_exif_turned.png": exif_jpeg(rgb, ORIENTATION_6, RESOLUTION_AS_TEXT, fmt="PNG"),
        "bad_exif_turned_cmyk.jpg": exif_jpeg(rgb.convert("CMYK"), ORIENTATION_6, RESOLUTION_AS_TEXT),
    }


def exif_jpeg(rgb: Image.Image, *entries: tuple[int, int, int, bytes], fmt: str = "JPEG") -> bytes:
    """``rgb`` saved with a hand-made little-endian EXIF block: (tag, type, count, value) entries."""
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0") for tag, kind, count, value in entries)
    buffer = io.BytesIO()
    rgb.save(buffer, format=fmt, exif=b"Exif\0\0II*\0\x08\0\0\0" + ifd + b"\0\0\0\0")
    return buffer.getvalue()


ORIENTATION_6 = (0x0112, 3, 1, struct.pack("<H", 6))
RESOLUTION_AS_TEXT = (0x011A, 2, 3, b"72\0")  # XResolution written as ASCII: PIL cannot rewrite it


def scrambled(data: bytes) -> bytes:
    """``data`` with its middle third overwritten by random bytes: the header parses, the scan does not."""
    third = len(data) // 3
    noise = np.random.default_rng(0).integers(0, 256, third, dtype=np.uint8).tobytes()
    return data[:third] + noise + data[2 * third :]


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8, 0, 9])
def test_exif_orientations_turn_images_as_pil_does(rng, orientation):
    stored = photo(rng, 5, 7)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(stored, exif=exif, quality=95)
    raw = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    np.testing.assert_array_equal(orient(raw, orientation).permute(1, 2, 0).numpy(), decode_image(data))


def test_no_images_decode_to_nothing():
    assert decode_on_device([], "cpu") == ([], [], [])


def test_every_route_gives_the_cpu_paths_image_or_its_error(rng):
    files = awkward_files(rng)
    images, errors, decoders = decode_on_device(list(files.values()), "cpu", max_pixels=1_000_000)
    by_name = dict(zip(files, zip(images, errors, decoders)))
    for name, data in files.items():
        image, error, decoder = by_name[name]
        try:
            expected = decode_image(data, 1_000_000)
        except BadImageError as exc:
            assert (image, error, decoder) == (None, str(exc), ""), name
            continue
        assert not error, name
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected, err_msg=name)
    routes = {name: by_name[name][2] for name in files}
    assert {name for name, route in routes.items() if route == "device"} == {
        "baseline.jpg", "progressive.jpg", "gray.jpg", "subsampled.jpg", "phone.jpg", "orientation_as_text.jpg",
        "bad_exif_turned.jpg"}
    assert routes["cmyk.jpg"] == routes["photo.png"] == routes["photo.webp"] == routes["trailing.jpg"] == "cpu"
    assert routes["stored_as_rgb.jpg"] == "cpu"
    assert routes["corrupt.jpg"] == routes["header_only.jpg"] == routes["scrambled.jpg"] == ""  # PIL named the fault


@pytest.mark.parametrize("name, sound", [
    ("empty", False), ("soi_only", False), ("baseline", True), ("progressive", True), ("optimized", True),
    ("gray", True), ("cmyk", True), ("restart_markers", True), ("exif", True), ("fill_bytes", True),
    ("truncated", False), ("header_only", False), ("scrambled", False), ("trailing_bytes", False),
    ("no_eoi", False), ("zero_length_segment", False),
])
def test_jpeg_structure_check(rng, name, sound):
    """nvJPEG decodes damaged files without a word: the check sends them to PIL."""
    rgb = photo(rng, 48, 64)
    base = jpeg(rgb, quality=90)
    data = {
        "empty": b"", "soi_only": b"\xff\xd8", "baseline": base, "progressive": jpeg(rgb, progressive=True),
        "optimized": jpeg(rgb, optimize=True), "gray": jpeg(rgb.convert("L")), "cmyk": jpeg(rgb.convert("CMYK")),
        "restart_markers": jpeg(rgb, restart_marker_blocks=2), "exif": exif_rotated_photo(rng, 30, 40),
        "fill_bytes": base[:2] + b"\xff\xff" + base[2:], "truncated": base[: len(base) // 2],
        "header_only": base[:200], "scrambled": scrambled(base), "trailing_bytes": base + b"more",
        "no_eoi": base[:-2], "zero_length_segment": base[:2] + b"\xff\xe0\x00\x00" + base[2:],
    }[name]
    assert jpeg_structure_is_sound(data) is sound


@pytest.mark.parametrize(("entry", "turned"), [
    (None, False),
    ((0x0112, 3, 1, struct.pack("<H", 6)), True),
    ((0x0112, 2, 2, b"6\0"), False),  # text: PIL's exif_transpose leaves such an image as it is
    ((0x0112, 5, 1, struct.pack("<I", 8)), False),  # a rational offset into nowhere: unreadable
    ((0x0112, 3, 1, struct.pack("<H", 9)), False),
])
def test_exif_orientation_is_read_as_pil_reads_it(rng, entry, turned):
    rgb = photo(rng, 20, 30)
    data = exif_jpeg(rgb, *([entry] if entry else []))
    upright = decode_image(data)
    assert upright.shape == ((30, 20, 3) if turned else (20, 30, 3))
    (image,), (error,), (decoder,) = decode_on_device([data], "cpu")
    assert not error and decoder == "device"
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), upright)


def test_a_malformed_exif_block_does_not_stop_decoding(rng):
    """exif_transpose rewrites the EXIF and fails on a resolution stored as text; we turn without it."""
    rgb = photo(rng, 20, 30)
    for fmt in ("JPEG", "PNG"):
        assert decode_image(exif_jpeg(rgb, ORIENTATION_6, RESOLUTION_AS_TEXT, fmt=fmt)).shape == (30, 20, 3)


def test_a_decoders_own_exception_is_a_bad_image(rng, monkeypatch):
    """Malformed files can make a PIL plugin raise TypeError or struct.error: an error row, not a crash."""
    from PIL import ImageFile

    data = encode(photo(rng, 20, 30))

    def broken(self):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    with pytest.raises(BadImageError, match=r"corrupt image \(TypeError: unsupported operand"):
        decode_image(data)


def test_images_over_the_pixel_limit_are_refused_from_their_header(rng):
    data = jpeg(photo(rng, 40, 50))
    _, errors, _ = decode_on_device([data], "cpu", max_pixels=1999)
    assert "exceeds the 1999-pixel limit" in errors[0]


def test_a_device_decoder_that_refuses_everything_loses_nothing(rng, monkeypatch):
    """As when nvJPEG refuses a batch and then each image: PIL decodes them all."""
    def refuse(*args, **kwargs):
        raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr("torchvision.io.decode_jpeg", refuse)
    files = [jpeg(photo(rng, 20, 30)), exif_rotated_photo(rng, 20, 30)]
    images, errors, decoders = decode_on_device(files, "cpu")
    assert errors == ["", ""] and decoders == ["cpu", "cpu"]
    for image, data in zip(images, files):
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), decode_image(data))


def test_a_failed_batch_is_retried_one_image_at_a_time(rng, monkeypatch):
    """As when nvJPEG refuses one image of a batch: the others still decode on the device, PIL takes that one."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    good, refused = jpeg(photo(rng, 20, 30)), jpeg(photo(rng, 24, 30))
    calls = []

    def decoder(data, **kwargs):
        calls.append(len(data) if isinstance(data, list) else 1)
        if isinstance(data, list) or bytes(data.numpy()) == refused:
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decoder)
    images, errors, decoders = decode_on_device([good, refused, good], "cpu")
    assert calls == [3, 1, 1, 1] and errors == ["", "", ""] and decoders == ["device", "cpu", "device"]
    np.testing.assert_array_equal(images[1].permute(1, 2, 0).numpy(), decode_image(refused))


@pytest.fixture
def stages(tmp_path, tiny_model):
    torch.save(tiny_model.state_dict(), tmp_path / "w.pt")
    args = ("tests.factories:tiny_resnet", str(tmp_path / "w.pt"), 5, SCALES, True, BoxConfig(scale=64))
    options = dict(batch_size=4, device="cpu", torch_threads=1)
    return CamBoxStage(*args, **options), EncodedCamBoxStage(*args, **options)


def test_bytes_in_gives_the_boxes_and_errors_of_the_pixels_path(rng, stages):
    by_pixels, by_bytes = stages
    files = awkward_files(rng)
    labels = [1] * len(files)
    labels[list(files).index("photo.png")] = -1
    labels[list(files).index("photo.webp")] = 9
    batch = records(files, labels)
    retry = [name in ("photo.webp", "baseline.jpg") for name in files]  # a read retried, then decoded
    batch = batch.set_column(batch.schema.get_field_index("retry"), "retry", pa.array(retry))
    expected = by_pixels(decode_and_resize(batch, SCALES)).to_pydict()
    got = by_bytes(batch).to_pydict()
    assert got == expected  # same boxes to the bit, same errors, sizes and provenance
    errors = {name: e for name, e in zip(got["image_id"], got["error"]) if e}
    assert set(errors) == BAD_ERRORS | {"header_only.jpg", "scrambled.jpg", "photo.png", "photo.webp"}
    assert errors["photo.png"] == "no label" and "outside the classifier" in errors["photo.webp"]
    assert not any(got["retry"])  # decoded, so a later error is lasting
    assert sum(map(len, got["boxes"])) > 0


def test_an_empty_batch_of_bytes_passes_through(stages):
    out = stages[1](records({}))
    assert out.num_rows == 0 and "data" not in out.column_names


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_every_route_gives_an_image_of_pils_shape_or_pils_error(rng):
    """nvJPEG's pixels differ from libjpeg's by a few levels (IDCT, chroma upsampling: 0.54 on
    average on real photos, benchmarks/bench_gpu_mine.py); damaged files get PIL's errors, not
    nvJPEG's silence."""
    files = awkward_files(rng)
    images, errors, decoders = decode_on_device(list(files.values()), "cuda")
    for (name, data), image, error in zip(files.items(), images, errors):
        try:
            expected = decode_image(data)
        except BadImageError as exc:
            assert (image, error) == (None, str(exc)), name
            continue
        assert not error and tuple(image.permute(1, 2, 0).shape) == expected.shape, name
    assert dict(zip(files, decoders))["baseline.jpg"] == "device"
