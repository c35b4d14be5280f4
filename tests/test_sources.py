import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dap_ray.data.sources import list_shards, read_shard
from tests.helpers import encode, photo


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def records(shards):
    return [r for shard in shards for r in read_shard(shard)]


def test_folder_shards_chunk_the_listing_and_skip_done_images(tmp_path, rng):
    for i in range(5):
        (tmp_path / "b").mkdir(exist_ok=True)
        (tmp_path / "b" / f"{i}.png").write_bytes(encode(photo(rng, 8, 8)))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(encode(photo(rng, 8, 8)))
    shards, classes, _ = list_shards(tmp_path, "folder", shard_size=2, skip=frozenset({"b/1.png"}))
    assert classes == ["a", "b"] and len(shards) == 3
    got = [(r["image_id"], r["label"]) for r in records(shards)]
    assert got == [("a/x.png", 0), ("b/0.png", 1), ("b/2.png", 1), ("b/3.png", 1), ("b/4.png", 1)]


def test_tar_labels_from_synset_tars_folders_and_cls_members(tmp_path, rng):
    image = encode(photo(rng, 8, 8))
    with tarfile.open(tmp_path / "n02.tar", "w") as tar:  # ImageNet-21K: one tar per synset
        add(tar, "n02_1.JPEG", image)
        add(tar, "n02_2.JPEG", image)
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:  # WebDataset with .cls, and a folder member
        add(tar, "k1.jpg", image)
        add(tar, "k1.cls", b"1")
        add(tar, "n01/img.jpg", image)
        add(tar, "k2.jpg", image)
        add(tar, "k2.cls", b"n99")
    (tmp_path / "classes.txt").write_text("n01\nn02\n")
    shards, classes, _ = list_shards(tmp_path, "tar", tmp_path / "classes.txt",
                                     skip=frozenset({"n02.tar::n02_2.JPEG"}))
    assert classes == ["n01", "n02"] and [s["name"] for s in shards] == ["n02.tar", "shard-000.tar"]
    got = {r["image_id"]: (r["label"], r["error"]) for r in records(shards)}
    assert got == {
        "n02.tar::n02_1.JPEG": (1, ""),
        "shard-000.tar::k1.jpg": (-1, "unknown class '1'"),  # a number is an index only without a class map
        "shard-000.tar::n01/img.jpg": (0, ""),
        "shard-000.tar::k2.jpg": (-1, "unknown class 'n99'"),
    }
    assert all(r["data"] == image for r in records(shards))


def test_broken_tar_is_one_error_record(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file at all" * 40)
    (got,) = records(list_shards(tmp_path, "tar")[0])
    assert got["image_id"] == "bad.tar::" and "tar" in got["error"]


def test_parquet_bytes_paths_and_class_names(tmp_path, rng):
    image = encode(photo(rng, 8, 8))
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "p.png").write_bytes(image)
    pq.write_table(pa.table({"image": [image, image], "label": [2, None]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"image": ["pics/p.png", "pics/missing.png"], "label": ["cat", "dog"]}),
                   tmp_path / "b.parquet")
    (tmp_path / "classes.txt").write_text("dog\ncat\nbird\n")
    shards, _, _ = list_shards(tmp_path, "parquet", tmp_path / "classes.txt")
    got = {r["image_id"]: (r["label"], r["error"][:16]) for r in records(shards)}
    assert got == {"a.parquet::0": (2, ""), "a.parquet::1": (-1, "missing label"),
                   "b.parquet::pics/p.png": (1, ""), "b.parquet::pics/missing.png": (0, "cannot read file")}


def test_parquet_without_the_columns_is_named(tmp_path):
    pq.write_table(pa.table({"img": [b"x"]}), tmp_path / "a.parquet")
    (got,) = records(list_shards(tmp_path, "parquet")[0])
    assert "missing column(s) ['image', 'label']" in got["error"]


@pytest.mark.parametrize(("fmt", "message"), [("zip", "unknown input format"), ("tar", "no .tar files")])
def test_bad_inputs_are_named(tmp_path, fmt, message):
    with pytest.raises(ValueError, match=message):
        list_shards(tmp_path, fmt)
    with pytest.raises(ValueError, match="input not found"):
        list_shards(tmp_path / "nope", "parquet")
