import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dap_ray.data.sources import ImageReader, id_to_path, list_shards, path_to_id, read_shard
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
    assert classes == ["a", "b"]
    assert [s["shard_id"] for s in shards] == ["a#0-1/1", "b#0-2/5", "b#2-4/5", "b#4-5/5"]  # ranges of each folder
    assert all("members" not in s for s in shards)  # the driver holds no list of images
    got = [(r["image_id"], r["label"], r["shard"], r["shard_total"]) for r in records(shards)]
    assert got == [("a/x.png", 0, "a#0-1/1", 1), ("b/0.png", 1, "b#0-2/5", 2), ("b/2.png", 1, "b#2-4/5", 2),
                   ("b/3.png", 1, "b#2-4/5", 2), ("b/4.png", 1, "b#4-5/5", 1)]


def test_folders_are_counted_by_the_map_given(tmp_path, rng):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "1.png").write_bytes(encode(photo(rng, 8, 8)))
    listed = []

    def parallel_map(fn, folders):  # as the mining step's Ray tasks: one call per class folder
        listed.extend(folders)
        return [fn(f) for f in folders]

    shards, _, _ = list_shards(tmp_path, "folder", map_fn=parallel_map)
    assert listed == ["a", "b", "c"] and len(shards) == 3


def test_a_folder_that_changes_while_mined_is_named(tmp_path, rng):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(encode(photo(rng, 8, 8)))
    shards, _, _ = list_shards(tmp_path, "folder")
    (tmp_path / "a" / "2.png").write_bytes(encode(photo(rng, 8, 8)))
    with pytest.raises(RuntimeError, match="holds 2 images where 1 were listed"):
        records(shards)


def test_tar_and_parquet_records_count_their_shard_whole(tmp_path, rng):
    image = encode(photo(rng, 8, 8))
    with tarfile.open(tmp_path / "n01.tar", "w") as tar:
        for i in range(3):
            add(tar, f"n01_{i}.png", image)
    pq.write_table(pa.table({"image": [image] * 4, "label": [0] * 4}), tmp_path / "p.parquet")
    for fmt, name, total in (("tar", "n01.tar", 3), ("parquet", "p.parquet", 4)):
        shards, _, _ = list_shards(tmp_path, fmt, skip={f"{name}::" + ("n01_0.png" if fmt == "tar" else "0")})
        got = records(shards)
        assert len(got) == total - 1 and {(r["shard"], r["shard_total"]) for r in got} == {(name, total)}


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
        "shard-000.tar::k1.jpg": (1, ""),  # a WebDataset .cls number is a label index, class map or not
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


@pytest.mark.parametrize("name, image_id", [
    ("", ""),
    ("n01/a.JPEG", "n01/a.JPEG"),
    ("n01/caf\u00e9.jpg", "n01/caf\u00e9.jpg"),  # UTF-8 names are their own ids
    ("n01/100%.jpg", "n01/100%25.jpg"),
    (b"n01/\xff\xfe.jpg".decode("utf-8", "surrogateescape"), "n01/%FF%FE.jpg"),  # Latin-1 bytes
    (b"n01/%41\xe9.jpg".decode("utf-8", "surrogateescape"), "n01/%2541%E9.jpg"),
])
def test_image_ids_of_any_file_name_survive_the_round_trip(name, image_id):
    assert path_to_id(name) == image_id
    assert id_to_path(image_id) == name
    image_id.encode("utf-8")  # writable to Parquet


def test_non_utf8_file_names_are_mined_and_read_back(tmp_path, rng):
    """A file name that is not UTF-8 (Latin-1 from an old archive) once killed the whole job."""
    image = encode(photo(rng, 8, 8))
    raw = tmp_path.as_posix().encode() + b"/n01/caf\xe9.png"
    (tmp_path / "n01").mkdir()
    with open(raw, "wb") as handle:
        handle.write(image)
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        add(tar, b"n01/na\xefve.jpg".decode("utf-8", "surrogateescape"), image)
    (tmp_path / "classes.txt").write_text("n01\n")
    folder = records(list_shards(tmp_path, "folder", tmp_path / "classes.txt")[0])
    tars = records(list_shards(tmp_path, "tar", tmp_path / "classes.txt")[0])
    assert [r["image_id"] for r in folder] == ["n01/caf%E9.png"] and not folder[0]["error"]
    assert [r["image_id"] for r in tars] == ["t.tar::n01/na%EFve.jpg"] and not tars[0]["error"]
    pa.table({"image_id": [r["image_id"] for r in folder + tars]})  # the ids are valid Parquet strings
    assert ImageReader(tmp_path, "folder").read("n01/caf%E9.png") == image
    assert ImageReader(tmp_path, "tar").read("t.tar::n01/na%EFve.jpg") == image


def test_tar_members_under_dot_slash_take_their_class_from_the_file_name(tmp_path, rng):
    """`tar -C n01440764 -cf n01440764.tar .` names members ./n01440764_1.JPEG: the class is not '.'."""
    image = encode(photo(rng, 8, 8))
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        add(tar, "./n02_1.JPEG", image)
        add(tar, "./n01/a.JPEG", image)
    (tmp_path / "classes.txt").write_text("n01\nn02\n")
    got = {r["image_id"]: (r["label"], r["error"]) for r in records(list_shards(tmp_path, "tar", tmp_path / "classes.txt")[0])}
    assert got == {"shard.tar::./n02_1.JPEG": (1, ""), "shard.tar::./n01/a.JPEG": (0, "")}


@pytest.mark.parametrize("cls, expected", [
    (b"0", (0, "")),
    (b"2", (2, "")),
    (b"3", (-1, "label 3 is outside the class map's 3 classes")),
    (b"b", (1, "")),
    (b"zz", (-1, "unknown class 'zz'")),
])
def test_webdataset_numeric_labels_with_a_class_map(tmp_path, rng, cls, expected):
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        add(tar, "k.jpg", encode(photo(rng, 8, 8)))
        add(tar, "k.cls", cls)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    (got,) = records(list_shards(tmp_path, "tar", tmp_path / "classes.txt")[0])
    assert (got["label"], got["error"]) == expected


def test_read_failures_that_may_pass_are_marked_for_retry(tmp_path, rng):
    image = encode(photo(rng, 8, 8))
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "ok.png").write_bytes(image)
    (tmp_path / "pics" / "corrupt.png").write_bytes(image[:20])
    pq.write_table(pa.table({"image": ["pics/ok.png", "pics/gone.png", "pics/corrupt.png"], "label": [0, 0, 0]}),
                   tmp_path / "a.parquet")
    got = {r["image_id"]: (bool(r["error"]), r["retry"]) for r in records(list_shards(tmp_path, "parquet")[0])}
    # a missing file may still be being copied: retried; a corrupt one is read fine and fails to decode later
    assert got == {"a.parquet::pics/ok.png": (False, False), "a.parquet::pics/gone.png": (True, True),
                   "a.parquet::pics/corrupt.png": (False, False)}


def test_a_shard_error_already_recorded_is_not_recorded_again(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file at all" * 40)
    shards, _, _ = list_shards(tmp_path, "tar", skip=frozenset({"bad.tar::"}))
    assert records(shards) == []


def test_a_rerun_reads_the_images_a_tar_held_before_its_fault(tmp_path, rng):
    """The tar's own error row used to make a rerun skip the whole tar, images not yet written included."""
    image = encode(photo(rng, 8, 8))
    with tarfile.open(tmp_path / "n01.tar", "w") as tar:
        add(tar, "n01_1.JPEG", image)
        add(tar, "n01_2.JPEG", image)
    data = (tmp_path / "n01.tar").read_bytes()
    (tmp_path / "n01.tar").write_bytes(data[:1024 + 512 + 100])  # cut inside the second member's data
    (tmp_path / "classes.txt").write_text("n01\n")
    first = records(list_shards(tmp_path, "tar", tmp_path / "classes.txt")[0])
    assert [r["image_id"] for r in first] == ["n01.tar::", "n01.tar::n01_1.JPEG", "n01.tar::n01_2.JPEG"]
    assert "corrupt" in first[0]["error"] and not first[1]["error"] and first[2]["error"]
    # A rerun after the tar's error row was written but not its images: they are read, the error not repeated.
    rerun = records(list_shards(tmp_path, "tar", tmp_path / "classes.txt", skip=frozenset({"n01.tar::"}))[0])
    assert [r["image_id"] for r in rerun] == ["n01.tar::n01_1.JPEG", "n01.tar::n01_2.JPEG"]


@pytest.mark.parametrize("cls", [b"\xc2\xb2", b"-1"])  # a superscript two; a negative number
def test_odd_webdataset_labels_are_errors_not_crashes(tmp_path, rng, cls):
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        add(tar, "k.jpg", encode(photo(rng, 8, 8)))
        add(tar, "k.cls", cls)
    (got,) = records(list_shards(tmp_path, "tar")[0])
    assert got["label"] == -1 and "unknown class" in got["error"]


@pytest.mark.parametrize("fmt", ["folder", "tar", "parquet"])
def test_images_plus_errors_is_every_image_in_the_input(tmp_path, rng, fmt):
    """Images of a class outside the class map are error records naming it, never dropped."""
    image = encode(photo(rng, 8, 8))
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = {"a": ["1.jpg", "2.jpg"], "zz": ["3.jpg", "sub/4.jpg"], "b": ["5.jpg"]}
    count = sum(len(v) for v in names.values())
    if fmt == "folder":
        for folder, files in names.items():
            for name in files:
                (inputs / folder / name).parent.mkdir(parents=True, exist_ok=True)
                (inputs / folder / name).write_bytes(image)
    elif fmt == "tar":
        for folder, files in names.items():
            with tarfile.open(inputs / f"{folder}.tar", "w") as tar:
                for i, _ in enumerate(files):
                    add(tar, f"{folder}_{i}.JPEG", image)  # ImageNet-21K: synset tars of SYNSET_N.JPEG
    else:
        labels = [folder for folder, files in names.items() for _ in files]
        pq.write_table(pa.table({"image": [image] * count, "label": labels[:-1] + ["9"]}), inputs / "p.parquet")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    shards, _, _ = list_shards(inputs, fmt, tmp_path / "classes.txt", shard_size=2)
    got = records(shards)
    assert len(got) == len({r["image_id"] for r in got}) == count
    errors = sorted(r["error"] for r in got if r["error"])
    if fmt == "folder":
        assert errors == ["unknown class 'zz': its folder is not in the class map"] * 2
    elif fmt == "tar":
        assert errors == ["unknown class 'zz'"] * 2
    else:
        assert errors == ["label 9 is outside the class map's 2 classes"] + ["unknown class 'zz'"] * 2
    assert all(r["label"] == -1 for r in got if r["error"]) and all(r["label"] >= 0 for r in got if not r["error"])


@pytest.mark.parametrize(
    ("label", "class_map", "expected"),
    [
        (1, True, (1, "")),
        (-2, True, (-1, "label -2 is negative")),
        (-2, False, (-1, "label -2 is negative")),
        (5, True, (-1, "label 5 is outside the class map's 2 classes")),
        (5, False, (5, "")),  # without a class map the classifier's own class count decides, later
    ],
)
def test_parquet_integer_labels_are_checked_against_the_class_map(tmp_path, rng, label, class_map, expected):
    pq.write_table(pa.table({"image": [encode(photo(rng, 8, 8))], "label": [label]}), tmp_path / "p.parquet")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    shards, _, _ = list_shards(tmp_path / "p.parquet", "parquet", tmp_path / "classes.txt" if class_map else None)
    (got,) = records(shards)
    assert (got["label"], got["error"]) == expected
