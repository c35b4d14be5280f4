"""jobs/mine.py's pipeline on Ray Data, end to end at tiny sizes."""

import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dap_ray.data.export import boxes_to_coco, read_boxes
from dap_ray.localisation.stages import BOXES_SCHEMA, ERRORS_SCHEMA, read_progress
from dap_ray.steps.mine import MineConfig, mine
from tests.helpers import BAD_ERRORS

ROOT = Path(__file__).resolve().parents[1]


def config(dataset, output, **overrides):
    sample, weights = dataset
    values = dict(input=str(sample / "images"), class_map=str(sample / "classes.txt"), output=str(output),
                  classifier="tests.factories:tiny_resnet", weights=str(weights), num_classes=3, scales=(32, 64),
                  batch_size=8, shard_size=8, rows_per_file=8, gt_boxes=str(sample / "gt_boxes.json"))
    return MineConfig(**{**values, **overrides})


def rows_by_id(output):
    return {r["image_id"]: r for r in read_boxes(Path(output) / "boxes")}


def errors_by_id(output):
    files = sorted((Path(output) / "errors").glob("*.parquet"))
    return {r["image_id"]: r["error"] for r in pq.read_table(files).to_pylist()} if files else {}


@pytest.fixture(scope="module")
def folder_run(ray_session, dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("folder_run")
    return output, mine(config(dataset, output))


def test_every_image_is_written_exactly_once_with_its_errors(folder_run):
    output, summary = folder_run
    boxes, errors = rows_by_id(output), errors_by_id(output)
    files = sorted((output / "boxes").glob("*.parquet")) + sorted((output / "errors").glob("*.parquet"))
    ids = [i for f in files for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist()]
    assert len(ids) == len(set(ids)) == 40  # images + errors = every file in the input
    assert {i.split("/")[1] for i in errors} == BAD_ERRORS
    assert all(errors.values())
    assert summary["images"] == len(boxes) == 36 and summary["errors"] == 4
    assert summary["boxes"] == sum(len(r["boxes"]) for r in boxes.values())
    assert summary["boxes_per_image"] == pytest.approx(summary["boxes"] / 36)
    assert "disc/caf%E9.jpg" in boxes  # a file name that is not UTF-8: mined, its id escaped
    assert (boxes["disc/phone.jpg"]["width"], boxes["disc/phone.jpg"]["height"]) == (40, 60)  # upright, by its EXIF
    assert summary["images_per_s"] > 0 and summary["quality"]["images"] == 30


def test_output_schema_and_box_convention(folder_run):
    output, _ = folder_run
    for path in (output / "boxes").glob("*.parquet"):
        assert pq.read_schema(path).equals(BOXES_SCHEMA, check_metadata=False)
    for path in (output / "errors").glob("*.parquet"):
        assert pq.read_schema(path).equals(ERRORS_SCHEMA, check_metadata=False)
    for row in rows_by_id(output).values():
        b = row["boxes"]
        assert b.dtype == np.float32 and b.shape == (len(row["scores"]), 4)
        assert (b[:, 0] <= b[:, 2]).all() and (b[:, 2] <= row["width"] - 1).all() and (b[:, 3] <= row["height"] - 1).all()
    saved = yaml.safe_load((output / "config.yaml").read_text())
    assert saved["scales"] == [32, 64] and Path(saved["input"]).is_absolute()
    assert json.loads((output / "summary.json").read_text())["config"]["preset"] == "official"


def test_coco_export_loads_in_pycocotools(folder_run, tmp_path):
    from pycocotools.coco import COCO

    output, summary = folder_run
    coco_path = tmp_path / "boxes.json"
    boxes_to_coco(output / "boxes", coco_path, ["disc", "square", "triangle"])
    coco = COCO(str(coco_path))
    assert len(coco.imgs) == 36 and len(coco.anns) == summary["boxes"]
    assert {c["name"] for c in coco.cats.values()} == {"disc", "square", "triangle"}


def test_rerun_after_lost_outputs_writes_exactly_what_was_missing(folder_run, dataset, tmp_path, monkeypatch):
    full_output, _ = folder_run
    output = tmp_path / "partial"
    shutil.copytree(full_output, output)
    parts = sorted((output / "boxes").glob("*.parquet"))
    # One of the lost images failed to read last time on a storage blip: it must be retried, not lost.
    blip = pq.read_table(parts[0]).column("image_id")[0].as_py()
    for path in parts[: len(parts) // 2]:  # as if the driver died before these were written
        path.unlink()
    pq.write_table(pa.table({"image_id": [blip], "label": [0], "error": ["cannot read file: I/O error"],
                             "retry": [True], "shard": [""]}, schema=ERRORS_SCHEMA), output / "errors" / "part-blip.parquet")
    sample, _ = dataset
    monkeypatch.chdir(sample)  # relative paths on the command line are stored absolute
    summary = mine(config(dataset, output, class_map="classes.txt", gt_boxes="gt_boxes.json"))
    saved = yaml.safe_load((output / "config.yaml").read_text())
    assert saved["class_map"] == str(sample / "classes.txt") and saved["gt_boxes"] == str(sample / "gt_boxes.json")
    assert blip in rows_by_id(output) and blip not in errors_by_id(output)
    assert summary["this_run"]["images"] > 0 and summary["images"] == 36 and summary["errors"] == 4
    expected, got = rows_by_id(full_output), rows_by_id(output)
    assert sorted(got) == sorted(expected)
    for image_id, row in expected.items():
        np.testing.assert_allclose(got[image_id]["boxes"], row["boxes"], atol=1e-3)
    again = mine(config(dataset, output))  # nothing left to do
    assert again["this_run"]["images"] == 0 and again["images"] == 36


def test_a_rerun_plans_from_file_footers_and_reads_only_partly_written_shards(folder_run, dataset, tmp_path,
                                                                             capsys):
    full_output, _ = folder_run
    output = tmp_path / "partial"
    shutil.copytree(full_output, output)
    (output / "boxes" / sorted(p.name for p in (output / "boxes").glob("*.parquet"))[-1]).unlink()
    progress = read_progress(output)
    assert not progress.legacy and 0 < len(progress.complete()) < len(progress.rows)
    summary = mine(config(dataset, output, gt_boxes=None))
    assert "shard(s) complete by their files' records" in capsys.readouterr().out
    assert 0 < summary["this_run"]["images"] <= 8 and summary["images"] == 36 and summary["errors"] == 4
    assert sorted(rows_by_id(output)) == sorted(rows_by_id(full_output))
    files = sorted((output / "boxes").glob("*.parquet")) + sorted((output / "errors").glob("*.parquet"))
    ids = [i for f in files for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist()]
    assert len(ids) == len(set(ids)) == 40
    assert read_progress(output).complete() == set(read_progress(output).rows)


def test_tar_and_parquet_inputs_give_the_folder_boxes(folder_run, dataset, tmp_path):
    full_output, _ = folder_run
    sample, _ = dataset
    expected = rows_by_id(full_output)
    good = sorted(i for i in expected if not i.startswith("disc/") or "_" in i)
    (tmp_path / "tars").mkdir()
    for name in ("disc", "square", "triangle"):  # one tar per class, as ImageNet-21K ships
        with tarfile.open(tmp_path / "tars" / f"{name}.tar", "w") as tar:
            for image_id in good:
                if image_id.startswith(name + "/"):
                    data = (sample / "images" / image_id).read_bytes()
                    # `tar -C square -cf square.tar .` names members ./square_1.jpg
                    info = tarfile.TarInfo(("./" if name == "square" else "") + image_id.split("/")[1])
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    outside = (sample / "images" / good[0]).read_bytes()  # images of a class the class map lacks
    with tarfile.open(tmp_path / "tars" / "zebra.tar", "w") as tar:
        for member in ("zebra_1.jpg", "zebra_2.jpg"):
            info = tarfile.TarInfo(member)
            info.size = len(outside)
            tar.addfile(info, io.BytesIO(outside))
    table = pa.table({"image": [(sample / "images" / i).read_bytes() for i in good] + [outside, outside],
                      "label": [i.split("/")[0] for i in good] + ["zebra", "7"]})
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "part-0.parquet")
    tar_out, pq_out = tmp_path / "out_tar", tmp_path / "out_pq"
    # The tar run sends encoded bytes to the model actors (the GPU path's stage, here on CPU).
    tar_rows = rows_by_id(mine(config(dataset, tar_out, input=str(tmp_path / "tars"), format="tar",
                                      gt_boxes=None, decode="actors"))["config"]["output"])
    pq_rows = rows_by_id(mine(config(dataset, pq_out, input=str(tmp_path / "pq"), format="parquet",
                                     gt_boxes=None))["config"]["output"])
    assert len(tar_rows) == len(pq_rows) == len(good)
    # images + errors = every image in the input, the unknown classes named in their rows
    assert errors_by_id(tar_out) == {f"zebra.tar::zebra_{i}.jpg": "unknown class 'zebra'" for i in (1, 2)}
    assert errors_by_id(pq_out) == {f"part-0.parquet::{len(good)}": "unknown class 'zebra'",
                                    f"part-0.parquet::{len(good) + 1}": "label 7 is outside the class map's 3 classes"}
    for k, image_id in enumerate(good):
        name = image_id.split("/")
        member = ("./" if name[0] == "square" else "") + name[1]
        np.testing.assert_allclose(tar_rows[f"{name[0]}.tar::{member}"]["boxes"], expected[image_id]["boxes"], atol=1e-3)
        np.testing.assert_allclose(pq_rows[f"part-0.parquet::{k}"]["boxes"], expected[image_id]["boxes"], atol=1e-3)


@pytest.mark.parametrize("change", [dict(scales=(48, 96)), dict(preset="paper"), dict(weights="other"),
                                    dict(shapes="buckets")])
def test_a_rerun_with_other_box_settings_is_refused_before_mixing_two_runs(folder_run, dataset, tmp_path, change):
    """6 images mined with one classifier and scales, then a rerun with others, used to end as 12
    images reported under the second's settings."""
    full_output, _ = folder_run
    output = tmp_path / "out"
    shutil.copytree(full_output, output)
    if change.get("weights") == "other":
        change = {"weights": str(shutil.copy(dataset[1], tmp_path / "other.pt"))}
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"other settings \\({key}: .*another --output"):
        mine(config(dataset, output, **change))
    assert (output / "config.yaml").read_text() == (full_output / "config.yaml").read_text()


def test_a_pool_holding_every_cpu_is_refused_before_it_waits_forever(ray_session, dataset, tmp_path):
    with pytest.raises(ValueError, match="--actors or --cpus-per-actor"):
        mine(config(dataset, tmp_path / "out", actors=(2, 2), cpus_per_actor=1.0))


def test_limit_mines_at_most_that_many(ray_session, dataset, tmp_path):
    summary = mine(config(dataset, tmp_path / "out", limit=5))
    assert summary["images"] + summary["errors"] == 5


def test_embedded_default_uses_the_cached_sample_and_classifier(trained_sample, tmp_path, monkeypatch):
    from dap_ray.steps.embedded import mine_defaults

    sample, run, _ = trained_sample
    cache = tmp_path / "cache" / "sample-v1"
    cache.mkdir(parents=True)
    (cache / "data").symlink_to(sample)
    (cache / "classifier").symlink_to(run)
    monkeypatch.setenv("DAP_RAY_CACHE", str(tmp_path / "cache"))
    cfg = mine_defaults(MineConfig(output=str(tmp_path / "out")))
    assert cfg.classifier == "tests.factories:tiny_resnet" and cfg.scales == (96, 192)
    summary = mine(MineConfig(**{**cfg.__dict__, "limit": 24}))
    assert summary["images"] == 24 and summary["quality"]["corloc"] > 0.1


def test_cluster_yaml_is_a_cluster_definition():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no work on the head
    assert cluster["docker"]["image"].startswith("rayproject/ray:") and cluster["docker"]["image"].endswith("-gpu")
    assert "ray-ml" not in cluster["docker"]["image"]
    workers = [t for n, t in cluster["available_node_types"].items() if n != cluster["head_node_type"]]
    assert all("min_workers" in t and "max_workers" in t for t in workers)
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert any("pip install" in c for c in cluster["setup_commands"])


def test_a_killed_actor_is_replaced_and_every_image_still_written_once(ray_session, dataset, tmp_path):
    import os
    import signal
    import threading
    import time

    output = tmp_path / "out"
    killed = []

    def actor_pids():
        """Processes of the model actors (Ray titles them after the stage)."""
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and b"CamBoxStage" in (entry / "cmdline").read_bytes():
                    yield int(entry.name)
            except OSError:
                continue

    def kill_one_actor_mid_run():
        deadline = time.time() + 120
        while time.time() < deadline:
            if list((output / "boxes").glob("*.parquet")):
                for pid in actor_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_actor_mid_run, daemon=True)
    killer.start()
    summary = mine(config(dataset, output, classifier="tests.factories:slow_tiny_resnet", weights=None,
                          batch_size=2, gt_boxes=None))
    killer.join(timeout=5)
    assert killed, "the run ended before an actor could be killed"
    files = sorted((output / "boxes").glob("*.parquet")) + sorted((output / "errors").glob("*.parquet"))
    ids = [i for f in files for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist()]
    assert len(ids) == len(set(ids)) == 40 and summary["images"] == 36


def test_a_pool_whose_actors_never_start_stops_with_a_reason(ray_session, dataset, tmp_path):
    # This Ray has no GPU and no autoscaler: the GPU path's actors can never start.
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"no model actor started within 2 s .*1 GPU\(s\)"):
        mine(config(dataset, tmp_path / "out", num_gpus_per_actor=1, actor_start_timeout_s=2))
    assert time.monotonic() - started < 60
