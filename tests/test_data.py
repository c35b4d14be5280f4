import io

import numpy as np
import pytest
from PIL import Image

from dap_ray.data.images import (
    BadImageError,
    decode_image,
    list_image_folder,
    read_class_map,
)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


RGB = Image.fromarray(np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 3)


@pytest.mark.parametrize(
    ("data", "shape"),
    [
        (encode(Image.new("RGB", (1, 1), (9, 8, 7))), (1, 1, 3)),
        (encode(RGB, "JPEG"), (4, 5, 3)),
        (encode(RGB.convert("L")), (4, 5, 3)),
        (encode(RGB.convert("RGBA")), (4, 5, 3)),
        (encode(RGB.convert("LA")), (4, 5, 3)),
        (encode(RGB.convert("P")), (4, 5, 3)),
        (encode(RGB.convert("CMYK"), "JPEG"), (4, 5, 3)),
        (encode(Image.fromarray((np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000))), (4, 5, 3)),
    ],
    ids=["1x1", "jpeg", "gray", "rgba", "gray-alpha", "palette", "cmyk", "16-bit"],
)
def test_colour_modes_are_converted_to_rgb(data, shape):
    image = decode_image(data)
    assert image.shape == shape and image.dtype == np.uint8


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535]], np.uint16)
    image = decode_image(encode(Image.fromarray(values)))
    assert image[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        (b"this is not an image", "not a recognised image format"),
        (encode(RGB, "JPEG")[:40], "corrupt or truncated"),
        (encode(Image.new("RGB", (300, 300)), "PNG")[:-30], "corrupt or truncated"),
    ],
    ids=["empty", "text", "truncated-jpeg", "truncated-png"],
)
def test_unreadable_data_is_a_bad_image_error(data, message):
    with pytest.raises(BadImageError, match=message):
        decode_image(data)


def test_huge_images_are_refused_from_the_header():
    data = encode(Image.new("L", (2000, 2000)))
    with pytest.raises(BadImageError, match="exceeds the 1000000-pixel limit"):
        decode_image(data, max_pixels=1_000_000)


def make_tree(root, layout):
    for relative in layout:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


@pytest.mark.parametrize("orientation, shape", [(None, (4, 5, 3)), (1, (4, 5, 3)), (3, (4, 5, 3)), (6, (5, 4, 3)),
                                                (8, (5, 4, 3))])
def test_exif_orientation_is_applied(orientation, shape):
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image = decode_image(encode(RGB, "JPEG", exif=exif, quality=100))
    assert image.shape == shape
    if orientation == 3:  # rotated 180 degrees: the stored top-left pixel is now bottom-right
        plain = decode_image(encode(RGB, "JPEG", quality=100))
        assert np.abs(image[::-1, ::-1].astype(int) - plain).max() <= 2


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none (a header is all PIL reads on open)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_the_pixel_limit_is_ours_not_pils():
    """PIL alone refuses from 179M pixels; the stated limit is 268M (16384 x 16384)."""
    with pytest.raises(BadImageError, match="corrupt or truncated"):  # under our limit: opened, then found empty
        decode_image(png_header(14000, 14000))  # 196M pixels
    with pytest.raises(BadImageError, match="exceeds the 268435456-pixel limit"):
        decode_image(png_header(17000, 17000))
    assert Image.MAX_IMAGE_PIXELS == 89478485  # PIL's own guard is left as it was


def test_folder_labels_follow_the_class_map_and_unknowns_are_reported(tmp_path):
    make_tree(tmp_path / "images", ["b/1.jpg", "a/2.JPEG", "a/sub/3.png", "zz/4.jpg", "a/notes.txt", "stray.jpg"])
    (tmp_path / "classes.txt").write_text("b\na\n")
    listing = list_image_folder(tmp_path / "images", tmp_path / "classes.txt")
    assert listing.classes == ["b", "a"]
    assert listing.items == [("a/2.JPEG", 1), ("a/sub/3.png", 1), ("b/1.jpg", 0)]
    assert listing.unknown_folders == ["zz"]
    assert sorted(listing.skipped_files) == ["a/notes.txt", "stray.jpg"]
    assert any("zz" in line for line in listing.problems())


def test_without_a_class_map_labels_are_sorted_folder_names(tmp_path):
    make_tree(tmp_path, ["c/1.jpg", "a/1.jpg", "b/1.jpg"])
    listing = list_image_folder(tmp_path)
    assert listing.classes == ["a", "b", "c"]
    assert [label for _, label in listing.items] == [0, 1, 2]


@pytest.mark.parametrize(
    ("layout", "class_map", "message"),
    [
        ([], None, "has no class folders"),
        (["a/x.txt"], None, "no images found"),
        (["a/1.jpg"], "a\na\n", "twice"),
        (["a/1.jpg"], "\n\n", "lists no classes"),
    ],
)
def test_bad_folders_and_class_maps_are_named(tmp_path, layout, class_map, message):
    root = tmp_path / "images"
    root.mkdir()
    make_tree(root, layout)
    map_path = None
    if class_map is not None:
        map_path = tmp_path / "classes.txt"
        map_path.write_text(class_map)
    with pytest.raises(ValueError, match=message):
        list_image_folder(root, map_path)


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match="image folder not found"):
        list_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="class map not found"):
        read_class_map(tmp_path / "nope.txt")


def test_synset_mapping_lines_keep_their_first_token(tmp_path):
    path = tmp_path / "LOC_synset_mapping.txt"
    path.write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n")
    assert read_class_map(path) == ["n01440764", "n01443537"]
