"""Step 3's data path at scale: the pseudo boxes' memory-mapped cache and one positioned read per image."""

import os
import pickle
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dap_ray.data.locations import LocatedImages, load_locations
from dap_ray.data.pseudo_boxes import PseudoBoxDataset, box_cache_folder, build_box_cache, load_pseudo_boxes
from dap_ray.data.sources import list_shards, read_shard
from dap_ray.localisation.stages import BOXES_SCHEMA
from tests.helpers import pseudo_run_as


def _write_boxes(folder, tables):
    folder.mkdir(parents=True, exist_ok=True)
    for k, rows in enumerate(tables):
        pq.write_table(pa.Table.from_pylist(rows, schema=BOXES_SCHEMA), folder / f"part-{k}.parquet")
    return folder


def _row(image_id, label, count, rng):
    corners = rng.uniform(0, 50, (count, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(1, 20, (count, 2))], 1).astype(np.float32)
    return {"image_id": image_id, "label": label, "width": int(rng.integers(60, 90)), "height": 70,
            "boxes": boxes.tolist(), "scores": rng.uniform(0, 1, count).astype(np.float32).tolist()}


def _plain(tables, max_boxes=None):
    """What the cache must hold, read the simple way: (ids, labels, sizes, boxes per image)."""
    rows = sorted((r for t in tables for r in t if r["label"] >= 0 and r["boxes"]), key=lambda r: r["image_id"])
    boxes = []
    for r in rows:
        order = np.argsort(-np.asarray(r["scores"], np.float32), kind="stable")[:max_boxes]
        boxes.append(np.asarray(r["boxes"], np.float32).reshape(-1, 4)[order])
    return [r["image_id"] for r in rows], [r["label"] for r in rows], [[r["width"], r["height"]] for r in rows], boxes


@pytest.mark.parametrize("shape", [
    [[]],  # a mining run that kept no image
    [[("b", 1, 3), ("a", 0, 0), ("c", -1, 1), ("d", 2, 1)]],  # without boxes / without label: counted, not held
    [[("z", 0, 2), ("k", 1, 5)], [], [("m", 2, 1), ("a", 0, 4), ("x", 1, 0)]],  # ids sorted across files
    [[(f"id{i:03d}", i % 7, i % 4) for i in range(200)], [(f"jd{i:03d}", 1, 9) for i in range(50)]],
])
@pytest.mark.parametrize("chunk_boxes", [1, 3, 1 << 22])  # the gather into id order, a chunk at a time
def test_box_cache_holds_what_a_plain_reading_gives(tmp_path, rng, shape, chunk_boxes):
    tables = [[_row(i, label, count, rng) for i, label, count in rows] for rows in shape]
    boxes_dir = _write_boxes(tmp_path / "run" / "boxes", tables)
    folder = box_cache_folder(boxes_dir)
    meta = build_box_cache(boxes_dir, folder, chunk_boxes=chunk_boxes)
    for cap in (None, 2):
        ids, labels, sizes, boxes = _plain(tables, cap)
        pseudo = load_pseudo_boxes(boxes_dir, max_boxes_per_image=cap)
        assert pseudo.folder == str(folder) and meta["images"] == len(pseudo) == len(ids)
        assert list(pseudo.image_ids) == ids and pseudo.labels.tolist() == labels
        assert pseudo.sizes.reshape(-1, 2).tolist() == sizes and pseudo.sizes.dtype == np.int32
        assert pseudo.num_boxes == sum(len(b) for b in boxes)
        for i, expected in enumerate(boxes):
            got = pseudo.boxes_of(i)
            assert got.dtype == np.float32 and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
    all_rows = [r for t in tables for r in t]
    assert pseudo.skipped_without_label == sum(r["label"] < 0 for r in all_rows)
    assert pseudo.skipped_without_boxes == sum(r["label"] >= 0 and not r["boxes"] for r in all_rows)


def test_box_cache_follows_the_boxes_and_pickles_as_its_path(tmp_path, rng):
    boxes_dir = _write_boxes(tmp_path / "run" / "boxes", [[_row("a", 0, 2, rng)]])
    first = load_pseudo_boxes(boxes_dir)
    assert (tmp_path / "run" / "pretrain_cache").is_dir()  # beside boxes/, shared by every pre-training run
    again = pickle.loads(pickle.dumps(first))
    assert isinstance(again.boxes, np.memmap) and again.folder == first.folder and len(pickle.dumps(first)) < 500
    _write_boxes(boxes_dir, [[_row("a", 0, 2, rng)], [_row("b", 1, 1, rng)]])  # a resumed mining run added a file
    assert list(load_pseudo_boxes(boxes_dir).image_ids) == ["a", "b"]
    with pytest.raises(ValueError, match="no Parquet files"):
        load_pseudo_boxes(tmp_path / "nothing")


def test_a_box_cache_is_built_by_one_of_two_racing_builders(tmp_path, rng):
    boxes_dir = _write_boxes(tmp_path / "run" / "boxes", [[_row("a", 0, 2, rng)]])
    folder = box_cache_folder(boxes_dir)
    build_box_cache(boxes_dir, folder)
    build_box_cache(boxes_dir, folder)  # the second rename loses and keeps the first copy
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


@pytest.fixture(scope="module")
def formats(pseudo_run, tmp_path_factory):
    """The pseudo run's images and boxes in each input format: fmt -> (boxes folder, input, read-as format)."""
    boxes_dir, sample, _ = pseudo_run
    root = tmp_path_factory.mktemp("formats")
    made = {"folder": (boxes_dir, sample / "images", "folder")}
    for fmt in ("tar", "webdataset", "parquet"):
        made[fmt] = pseudo_run_as(fmt, root, boxes_dir, sample / "images", sample / "classes.txt")
    return made


@pytest.mark.parametrize("fmt", ["folder", "tar", "webdataset", "parquet"])
def test_every_image_reads_the_bytes_that_mining_read(formats, fmt):
    boxes_dir, source, read_as = formats[fmt]
    mined = {r["image_id"]: r["data"] for s in list_shards(source, read_as)[0] for r in read_shard(s)}
    pseudo = load_pseudo_boxes(boxes_dir)
    locations = load_locations(pseudo, source, read_as)
    assert locations.missing == 0 and len(pseudo) == 22
    images = LocatedImages(pseudo, locations)
    for i in reversed(range(len(pseudo))):
        assert images.read(i) == mined[pseudo.image_id(i)], pseudo.image_id(i)
    again = load_locations(pseudo, source, read_as)  # from the cache, memory-mapped
    assert fmt == "folder" or again.folder == locations.folder is not None
    copy = pickle.loads(pickle.dumps(images))
    assert copy.read(3) == images.read(3)


@pytest.mark.parametrize("fmt", ["tar", "webdataset", "parquet"])
def test_a_located_read_touches_the_image_alone(formats, fmt, monkeypatch):
    boxes_dir, source, read_as = formats[fmt]
    pseudo = load_pseudo_boxes(boxes_dir)
    images = LocatedImages(pseudo, load_locations(pseudo, source, read_as))
    files = {p: p.stat().st_size for p in source.iterdir()}
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: reads.append(n) or real_pread(fd, n, at))
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("a located read walked a tar's headers"))
    monkeypatch.setattr(pq, "ParquetFile", lambda *a, **k: pytest.fail("a located read opened Parquet's reader"))
    for i in (5, 17, 2, 21, 0):
        reads.clear()
        data = images.read(i)
        if read_as == "tar":
            assert reads == [len(data)]  # one read of the member's own bytes: no header, no other member
        else:
            # The data page holding the row, and for a dictionary-encoded page (pyarrow's default for small
            # values) that column chunk's dictionary page: with row groups of 5 images, never a whole file.
            assert 1 <= len(reads) <= 2 and len(data) <= max(reads) and sum(reads) < max(files.values()) / 2


def test_images_gone_from_the_input_are_counted_then_replaced_in_training(formats, tmp_path):
    import shutil

    boxes_dir, source, _ = formats["tar"]
    moved = tmp_path / "tar"
    shutil.copytree(source, moved)
    first = sorted(moved.glob("*.tar"))[-1]
    with tarfile.open(first) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]
    with tarfile.open(first, "w") as tar:  # the tar loses its first member
        for info, data in members[1:]:
            tar.addfile(info, __import__("io").BytesIO(data))
    pseudo = load_pseudo_boxes(boxes_dir)
    locations = load_locations(pseudo, moved, "tar")
    assert locations.missing == 1
    gone = int(np.flatnonzero(np.asarray(locations.file_index) < 0)[0])
    images = LocatedImages(pseudo, locations)
    with pytest.raises(KeyError, match="not found"):
        images.read(gone)
    sample = PseudoBoxDataset(pseudo, images, max_size=96)[(gone, 48, False)]
    assert sample["image_id"] == pseudo.image_id((gone + 1) % len(pseudo))

    with open(first, "ab") as handle:  # changed after it was indexed: refused, never misread
        handle.write(b"\0" * 1024)
    same_tar = int(np.flatnonzero(np.asarray(locations.file_index) == locations.files.index(first.name))[0])
    with pytest.raises(OSError, match="changed since it was indexed"):
        LocatedImages(pseudo, locations).read(same_tar)


def test_unreadable_input_files_are_named_and_their_images_counted(formats, tmp_path):
    import shutil

    boxes_dir, source, _ = formats["parquet"]
    broken = tmp_path / "parquet"
    shutil.copytree(source, broken)
    (broken / "images.parquet").write_bytes(b"not parquet")
    pseudo = load_pseudo_boxes(boxes_dir)
    locations = load_locations(pseudo, broken, "parquet")
    assert locations.missing == len(pseudo) and "cannot index images.parquet" in locations.problems[0]


def test_parquet_of_whole_row_groups_per_page_is_named_then_repacked_into_small_pages(formats, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    boxes_dir, source, _ = formats["parquet"]
    rows = pq.read_table(source / "images.parquet")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    # pyarrow's defaults: all 22 images of a row group in one dictionary page.
    pq.write_table(pa.concat_tables([rows] * 4).slice(0, 88), crowded / "images.parquet", row_group_size=88)
    pseudo = load_pseudo_boxes(boxes_dir)
    assert any("jobs/repack_parquet.py" in p for p in load_locations(pseudo, crowded, "parquet").problems)

    root = Path(__file__).resolve().parents[1]
    job = [sys.executable, "jobs/repack_parquet.py", "--input", str(crowded), "--output", str(tmp_path / "small"),
           "--page-bytes", "4096"]
    done = subprocess.run(job, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "rewrote 1 file(s)" in done.stdout and (tmp_path / "small" / "repack.yaml").is_file()
    assert pq.read_table(tmp_path / "small" / "images.parquet").equals(pq.read_table(crowded / "images.parquet"))
    locations = load_locations(pseudo, tmp_path / "small", "parquet")
    assert not locations.problems and locations.missing == 0
    images = LocatedImages(pseudo, locations)
    assert [images.read(i) for i in range(len(pseudo))] == [LocatedImages(pseudo, load_locations(
        pseudo, source, "parquet")).read(i) for i in range(len(pseudo))]
    again = subprocess.run(job, cwd=root, capture_output=True, text=True)  # a rerun keeps what is written
    assert again.returncode == 0 and "(1 already done)" in again.stdout
    bad = subprocess.run(job[:2] + ["--input", str(tmp_path / "nothing")] + job[4:], cwd=root, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "input not found" in bad.stderr and "Traceback" not in bad.stderr


def test_an_index_is_built_again_when_its_files_change_even_at_the_same_size(formats, tmp_path):
    import io
    import shutil

    from dap_ray.data.locations import changed_files

    boxes_dir, source, _ = formats["tar"]
    moved = tmp_path / "tar"
    shutil.copytree(source, moved)
    pseudo = load_pseudo_boxes(boxes_dir)
    first = load_locations(pseudo, moved, "tar")
    mined = [LocatedImages(pseudo, first).read(i) for i in range(len(pseudo))]
    tar_path = moved / first.files[1]
    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]
    size = tar_path.stat().st_size
    with tarfile.open(tar_path, "w") as tar:  # the same members in another order: the same size, other offsets
        for info, data in reversed(members):
            tar.addfile(info, io.BytesIO(data))
    assert tar_path.stat().st_size == size and changed_files(first) == [first.files[1]]
    in_that_tar = int(np.flatnonzero(np.asarray(first.file_index) == 1)[0])
    with pytest.raises(OSError, match="changed since it was indexed"):
        LocatedImages(pseudo, first).read(in_that_tar)  # never the bytes of another member
    again = load_locations(pseudo, moved, "tar", check_files=True)
    assert not changed_files(again)
    assert [LocatedImages(pseudo, again).read(i) for i in range(len(pseudo))] == mined


@pytest.mark.parametrize("damage, problem", [
    ("gzip", "a compressed tar"),  # mining reads it; its members cannot be read in place
    ("truncate", "is corrupt after"),  # the members before the fault are kept, as mining keeps them
])
def test_tars_that_cannot_be_read_in_place_are_named(formats, tmp_path, damage, problem):
    import gzip
    import shutil

    boxes_dir, source, _ = formats["tar"]
    moved = tmp_path / "tar"
    shutil.copytree(source, moved)
    pseudo = load_pseudo_boxes(boxes_dir)
    name = sorted(p.name for p in moved.glob("*.tar"))[1]
    data = (moved / name).read_bytes()
    if damage == "gzip":
        (moved / name).write_bytes(gzip.compress(data))
    else:
        with tarfile.open(moved / name) as tar:
            first = tar.next()
        end = first.offset_data + -(-first.size // 512) * 512
        (moved / name).write_bytes(data[: end + 612])  # one whole member, then a header and part of its bytes
    locations = load_locations(pseudo, moved, "tar")
    assert any(problem in p and name in p for p in locations.problems), locations.problems
    in_tar = np.asarray(locations.file_index) == locations.files.index(name)
    images = LocatedImages(pseudo, locations)
    assert (damage == "gzip") == (not in_tar.any())
    for i in np.flatnonzero(in_tar):
        assert images.read(int(i))  # what the index kept reads whole


def test_ids_of_another_format_and_corrupt_parquet_pages_cost_images_not_the_run(formats, tmp_path):
    import shutil

    boxes_dir, source, _ = formats["folder"]
    pseudo = load_pseudo_boxes(boxes_dir)  # folder ids, no "::": read as tars they match nothing
    tars = formats["tar"][1]
    assert load_locations(pseudo, tars, "tar").missing == len(pseudo)

    boxes_dir, source, _ = formats["parquet"]
    broken = tmp_path / "parquet"
    shutil.copytree(source, broken)
    pseudo = load_pseudo_boxes(boxes_dir)
    locations = load_locations(pseudo, broken, "parquet")
    data = bytearray((broken / "images.parquet").read_bytes())
    start = int(locations.pages["pages_offset"][0])
    data[start : start + 8] = b"\xff" * 8  # the first data page's header, garbled
    stat = (broken / "images.parquet").stat()
    (broken / "images.parquet").write_bytes(bytes(data))
    os.utime(broken / "images.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # unnoticed by the file check
    first_row = int(np.argmin(np.asarray(locations.offset)))  # the lowest row held: in the first page
    with pytest.raises(OSError, match="cannot read"):
        LocatedImages(pseudo, locations).read(first_row)
    assert "image_id" in PseudoBoxDataset(pseudo, LocatedImages(pseudo, locations), max_size=96)[(first_row, 48, False)]

    wrong_column = load_locations(pseudo, source, "parquet", image_column="jpg")
    assert wrong_column.missing == len(pseudo) and "no column 'jpg'" in wrong_column.problems[0]


def test_large_boxes_have_their_cache_built_in_a_ray_task(formats, ray_session, tmp_path):
    import dap_ray.steps.pretrain as step
    from dap_ray.steps.pretrain import PretrainConfig, prepare_data

    boxes_dir, source, _ = formats["webdataset"]
    built = []

    def in_task(fn, *args):  # what pretrain() passes for boxes over IN_TASK_BYTES
        built.append(fn.__name__)
        return step._build_in_task(fn, *args)

    cfg = PretrainConfig(boxes=str(boxes_dir), output=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    cfg, pseudo, classes = prepare_data(cfg, build=in_task)
    assert built == ["build_training_cache"] and len(pseudo) == 22 and classes == ["disc", "square", "triangle"]
    assert pseudo.folder.startswith(str(tmp_path / "cache"))
    locations = load_locations(pseudo, source, "tar")  # the task's index, opened here
    assert locations.folder is not None and locations.missing == 0
    assert LocatedImages(pseudo, locations).read(0)
    prepare_data(cfg, build=in_task)
    assert built == ["build_training_cache"]  # built once: a second run only opens it
