"""The mining stages, without Ray."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dap_ray.localisation.boxes import BoxConfig
from dap_ray.localisation.stages import (
    BOXES_SCHEMA,
    CamBoxStage,
    decode_and_resize,
    drop_retryable_errors,
    plan_resume,
    read_done_ids,
    read_progress,
    write_results,
)
from dap_ray.steps.mine import (
    CPU_BATCH_SIZE,
    GPU_BATCH_SIZE,
    MineConfig,
    actor_pool_sizes,
    actor_shapes,
    pool_problem,
    resolve_actor_pool,
)
from tests.helpers import BAD_ERRORS, bad_files, encode, photo

SCALES = (32, 64)


def records(named: dict[str, bytes], label: int = 1) -> pa.Table:
    return pa.table({"image_id": list(named), "label": [label] * len(named), "data": list(named.values()),
                     "error": [""] * len(named)})


@pytest.fixture
def stage(tmp_path, tiny_model):
    torch.save(tiny_model.state_dict(), tmp_path / "w.pt")
    return CamBoxStage("tests.factories:tiny_resnet", str(tmp_path / "w.pt"), 5, SCALES, True,
                       BoxConfig(scale=64), batch_size=4, device="cpu", torch_threads=1)


def test_empty_batch_passes_through(stage):
    decoded = decode_and_resize(records({}), SCALES)
    assert decoded.num_rows == 0
    assert stage(decoded).num_rows == 0


def test_bad_inputs_become_error_rows_and_good_ones_are_mined(rng, stage):
    files = {"good.jpg": encode(photo(rng, 60, 80), "JPEG"), **bad_files(rng)}
    out = stage(decode_and_resize(records(files), SCALES)).to_pydict()
    errors = {i: e for i, e in zip(out["image_id"], out["error"]) if e}
    assert set(errors) == BAD_ERRORS
    assert "truncated" in errors["corrupt.jpg"] and "empty" in errors["empty.jpg"]
    assert "not a recognised image" in errors["text.jpg"] and "too small" in errors["tiny.png"]
    for image_id, boxes, width in zip(out["image_id"], out["boxes"], out["width"]):
        if image_id not in errors:
            assert len(boxes) >= 1 and all(len(b) == 4 and 0 <= b[0] <= b[2] <= width - 1 for b in boxes)


def test_constant_cam_is_an_error_row(tmp_path, rng, tiny_model):
    with torch.no_grad():
        tiny_model.fc.weight.zero_()
    torch.save(tiny_model.state_dict(), tmp_path / "w.pt")
    stage = CamBoxStage("tests.factories:tiny_resnet", str(tmp_path / "w.pt"), 5, SCALES, True, BoxConfig(scale=64), 4)
    out = stage(decode_and_resize(records({"x.png": encode(photo(rng, 40, 40))}), SCALES)).to_pydict()
    assert out["error"] == ["constant class activation map: nothing to localise"] and out["boxes"] == [[]]


def test_the_stage_passes_its_shape_and_compile_options_on(tmp_path, rng, tiny_model, capsys):
    torch.save(tiny_model.state_dict(), tmp_path / "w.pt")
    stage = CamBoxStage("tests.factories:tiny_resnet", str(tmp_path / "w.pt"), 5, SCALES, True, BoxConfig(scale=64),
                        batch_size=8, device="cpu", shapes="buckets", forward_images=3, compile="reduce-overhead")
    extractor = stage.extractor
    assert (extractor.shapes, extractor.batch_size, extractor.compile_mode) == ("buckets", 3, "off")
    assert "warning: compile=reduce-overhead (CUDA graphs) needs CUDA" in capsys.readouterr().out
    files = {f"{i}.jpg": encode(photo(rng, 60, 60 + 20 * i), "JPEG") for i in range(4)}
    out = stage(decode_and_resize(records(files), SCALES)).to_pydict()
    assert out["error"] == [""] * 4 and all(len(b) >= 1 for b in out["boxes"])


@pytest.mark.parametrize(("shapes", "on_gpu", "expected"), [
    ("auto", False, "exact"), ("auto", True, "buckets"), ("exact", True, "exact"), ("buckets", False, "buckets")])
def test_auto_shapes_are_buckets_on_gpus_and_exact_on_cpu(shapes, on_gpu, expected):
    assert actor_shapes(shapes, on_gpu) == expected


def test_huge_images_and_unknown_labels_are_errors(rng, stage):
    big = {"big.png": encode(photo(rng, 100, 100))}
    out = decode_and_resize(records(big), SCALES, max_pixels=5000).to_pydict()
    assert "exceeds" in out["error"][0]
    unlabelled = stage(decode_and_resize(records(big, label=-1), SCALES)).to_pydict()
    assert unlabelled["error"] == ["no label"]
    outside = stage(decode_and_resize(records(big, label=9), SCALES)).to_pydict()
    assert "outside the classifier's 5 classes" in outside["error"][0]


def test_write_is_whole_named_by_content_and_idempotent(tmp_path):
    batch = pa.table({"image_id": ["a", "b", "c"], "label": [0, 1, 2], "width": [10, 10, 10], "height": [8, 8, 8],
                      "boxes": [[[0.0, 0.0, 5.0, 5.0]], [], []], "scores": [[1.0], [], []],
                      "error": ["", "", "broken"]})
    counts = write_results(batch, str(tmp_path)).to_pydict()
    assert counts == {"images": [2], "errors": [1], "boxes": [1]}
    first = sorted(p.name for p in tmp_path.rglob("*.parquet"))
    write_results(batch, str(tmp_path))  # a retried task
    assert sorted(p.name for p in tmp_path.rglob("*.parquet")) == first
    assert not list(tmp_path.rglob("*.partial"))
    (boxes_file,) = (tmp_path / "boxes").glob("*.parquet")
    table = pq.read_table(boxes_file)
    assert table.schema.equals(BOXES_SCHEMA, check_metadata=False)
    assert table.column("boxes").to_pylist() == [[[0.0, 0.0, 5.0, 5.0]], []]
    assert read_done_ids(tmp_path) == {"a", "b", "c"}


def test_errors_that_may_pass_are_retried_on_a_rerun_and_lasting_ones_are_not(tmp_path, stage):
    """A read that failed once (a storage blip) used to count as done for good."""
    batch = pa.table({"image_id": ["gone", "corrupt", "c"], "label": [1, 1, 1], "data": [b"", b"xx", b""],
                      "error": ["cannot read file: No such file or directory", "", "cannot read file: I/O error"],
                      "retry": [True, False, True]})
    out = stage(decode_and_resize(batch, SCALES))
    assert out.column("retry").to_pylist() == [True, False, True]
    write_results(out, str(tmp_path))
    write_results(pa.table({"image_id": ["old"], "label": [0], "width": [1], "height": [1], "boxes": [[]],
                            "scores": [[]], "error": ["old lasting error"]}), str(tmp_path))  # no retry column
    assert read_done_ids(tmp_path) == {"gone", "corrupt", "c", "old"}
    assert drop_retryable_errors(tmp_path) == 2
    assert read_done_ids(tmp_path) == {"corrupt", "old"}
    assert drop_retryable_errors(tmp_path) == 0


def boxes_batch(ids, shard, total, errors=None):
    n = len(ids)
    return pa.table({"image_id": ids, "label": [0] * n, "width": [9] * n, "height": [9] * n, "boxes": [[]] * n,
                     "scores": [[]] * n, "error": errors or [""] * n, "retry": [False] * n,
                     "shard": [shard] * n, "shard_total": [total] * n})


@pytest.mark.parametrize(
    ("written", "complete", "skips"),
    [
        ([], set(), {"a#0-2/3": [], "a#2-3/3": [], "b#0-3/3": []}),  # nothing written: every shard, none skipped
        ([(["a/1", "a/2"], "a#0-2/3", 2)], {"a#0-2/3"}, {"a#2-3/3": [], "b#0-3/3": []}),
        ([(["b/x"], "b#0-3/3", 3), (["b/y"], "b#0-3/3", 3)], set(),
         {"a#0-2/3": [], "a#2-3/3": [], "b#0-3/3": ["b/x", "b/y"]}),  # partly written: its files' ids are read
        ([(["a/3"], "a#2-3/3", 1), (["b/x", "b/y", "b/z"], "b#0-3/3", 3)], {"a#2-3/3", "b#0-3/3"},
         {"a#0-2/3": []}),  # complete shards' ids are never read
    ],
)
def test_resume_plans_from_footers(tmp_path, written, complete, skips):
    for ids, shard, total in written:
        write_results(boxes_batch(ids, shard, total), str(tmp_path))
    progress = read_progress(tmp_path)
    assert progress.complete() == complete and not progress.legacy
    shards = [{"shard_id": shard, "key": shard[0], "format": "folder"} for shard in ("a#0-2/3", "a#2-3/3", "b#0-3/3")]
    remaining, _ = plan_resume(shards, progress, tmp_path)
    assert {s["shard_id"]: s["skip"] for s in remaining} == skips


def test_outputs_without_shard_records_are_resumed_by_their_ids(tmp_path):
    write_results(boxes_batch(["a/1"], "a#0-2/2", 2).drop_columns(["shard", "shard_total"]), str(tmp_path))
    progress = read_progress(tmp_path)
    remaining, how = plan_resume([{"shard_id": "a#0-2/2", "key": "a", "format": "folder"}], progress, tmp_path)
    assert len(progress.legacy) == 1 and remaining[0]["skip"] == ["a/1"] and "read all 1 ids" in how


def test_error_files_keep_their_shard_record_when_retries_are_dropped(tmp_path):
    batch = boxes_batch(["a/1", "a/2", "a/3"], "a#0-3/3", 3, errors=["", "I/O error", "corrupt"])
    write_results(batch.set_column(7, "retry", pa.array([False, True, False])), str(tmp_path))
    assert read_progress(tmp_path).complete() == {"a#0-3/3"}
    assert drop_retryable_errors(tmp_path) == 1
    progress = read_progress(tmp_path)
    assert progress.rows == {"a#0-3/3": 2} and progress.totals == {"a#0-3/3": 3} and not progress.complete()
    (errors,) = (tmp_path / "errors").glob("*.parquet")
    assert pq.read_table(errors).column("shard").to_pylist() == ["a#0-3/3"]


def test_exif_rotated_photos_are_mined_upright(rng, stage):
    """A phone photo stored sideways with EXIF orientation 6: sizes and boxes are the upright image's."""
    import io

    from PIL import Image

    stored = photo(rng, 40, 90)  # 90 wide, 40 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    out = stage(decode_and_resize(records({"phone.jpg": buffer.getvalue()}), SCALES)).to_pydict()
    assert (out["width"], out["height"]) == ([40], [90]) and not out["error"][0]
    assert all(b[2] <= 40 and b[3] <= 90 for b in out["boxes"][0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(actors=(2, 1)), "actors"), (dict(scales=()), "scales"), (dict(batch_size=0), "batch_size"),
     (dict(decode="gpu"), "decode"), (dict(device="tpu"), "device must be"),
     (dict(device="cuda"), "device cuda needs --num-gpus-per-actor"),
     (dict(actor_start_timeout_s=-1), "actor_start_timeout_s"),
     (dict(thresholds=(1.5,)), "thresholds"), (dict(preset="x"), "unknown preset"), (dict(limit=0), "limit"),
     (dict(cpus_per_actor=-1), "cpus_per_actor"), (dict(torch_threads=0), "torch_threads")],
)
def test_bad_mine_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MineConfig(**kwargs)


@pytest.mark.parametrize(
    ("options", "node_cpus", "shards", "actors", "cpus", "threads"),
    [
        (dict(), 1, None, (1, 1), 0.0, 1),  # a one-CPU node: the actor reserves none, the tasks get the CPU
        (dict(), 2, None, (2, 2), 0.5, 1),
        (dict(), 3, None, (2, 2), 1.0, 1),
        (dict(), 16, None, (2, 2), 7.5, 8),
        (dict(), 16, 1, (1, 1), 15.0, 16),  # one input shard: one actor
        (dict(actors=(1, 4)), 8, None, (1, 4), 1.75, 2),
        (dict(cpus_per_actor=1.0), 2, None, (1, 1), 1.0, 2),
        (dict(cpus_per_actor=2.0, torch_threads=3), 16, None, (2, 2), 2.0, 3),
        (dict(num_gpus_per_actor=1.0), 16, None, None, 1.0, None),  # autoscales: actor_pool_sizes
        (dict(num_gpus_per_actor=0.5, actors=(2, 8), cpus_per_actor=4.0), 16, 1, (2, 8), 4.0, None),
    ],
)
def test_actor_pool_defaults_leave_a_cpu_for_the_tasks(options, node_cpus, shards, actors, cpus, threads):
    cfg = resolve_actor_pool(MineConfig(**options), node_cpus, shards)
    assert (cfg.actors, cfg.cpus_per_actor, cfg.torch_threads) == (actors, cpus, threads)
    assert pool_problem(cfg, node_cpus) is None


@pytest.mark.parametrize(
    ("options", "sizes"),
    [
        (dict(num_gpus_per_actor=1.0), (1, None)),  # from one actor up to every GPU the cluster has or can add
        (dict(num_gpus_per_actor=1.0, actors=(2, 4)), (2, 4)),
        (dict(), (2, 2)),  # CPU: a fixed pool
    ],
)
def test_gpu_pools_autoscale_with_the_cluster(options, sizes):
    assert actor_pool_sizes(resolve_actor_pool(MineConfig(**options), 16)) == sizes


@pytest.mark.parametrize(
    ("options", "batch_size"),
    [
        (dict(), CPU_BATCH_SIZE),
        (dict(num_gpus_per_actor=1.0), GPU_BATCH_SIZE),  # larger: only images of one padded shape share a forward
        (dict(num_gpus_per_actor=1.0, batch_size=64), 64),
        (dict(batch_size=8), 8),
    ],
)
def test_model_batches_default_by_device(options, batch_size):
    assert resolve_actor_pool(MineConfig(**options), 16).batch_size == batch_size


def test_a_pool_that_would_hold_every_cpu_is_named():
    cfg = resolve_actor_pool(MineConfig(actors=(2, 2), cpus_per_actor=1.0), 2)
    assert "--actors or --cpus-per-actor" in pool_problem(cfg, 2)
    assert pool_problem(cfg, 4) is None


def test_box_config_follows_the_largest_scale():
    assert MineConfig(scales=(96, 192), preset="paper").box_config() == BoxConfig.from_preset("paper", scale=192)
    assert np.isclose(MineConfig().box_config().nms_iou, 0.8)


def test_images_are_labelled_in_the_classifiers_class_order(tmp_path):
    """Step 1's classes.txt is not sorted; mining with its weights and no class map used to label by
    sorted folder names, taking every CAM for the wrong class (CorLoc 0.017 instead of 0.317)."""
    import json

    from dap_ray.steps.mine import _classifier_class_map

    run = tmp_path / "run"
    run.mkdir()
    (run / "classifier.pt").write_bytes(b"")
    (run / "meta.json").write_text(json.dumps({"classes": ["disc", "square", "triangle"]}))
    cfg = MineConfig(input=str(tmp_path), weights=str(run / "classifier.pt"))
    resolved, to_write = _classifier_class_map(cfg, tmp_path)
    assert to_write == ["disc", "square", "triangle"]  # written once the run is known to go ahead
    assert resolved.class_map == str(tmp_path / "classes.txt")
    (tmp_path / "given.txt").write_text("disc\ntriangle\nsquare\n")
    with pytest.raises(ValueError, match="line 2 is 'triangle' where the classifier has 'square'"):
        _classifier_class_map(MineConfig(input=str(tmp_path), weights=cfg.weights, class_map=str(tmp_path / "given.txt")),
                              tmp_path)
    plain = MineConfig(input=str(tmp_path), weights=str(tmp_path / "zoo.pt"))  # a model zoo file: no meta.json
    assert _classifier_class_map(plain, tmp_path) == (plain, None)


def test_a_refused_rerun_leaves_the_runs_class_names_as_they_were(tmp_path):
    """The classifier's classes used to be written into OUTPUT/classes.txt before the settings check,
    so a refused rerun with other weights still renamed the earlier run's labels."""
    import json

    import yaml

    from dap_ray.config import config_to_dict
    from dap_ray.steps.mine import mine

    (tmp_path / "images" / "a").mkdir(parents=True)
    output = tmp_path / "out"
    write_results(pa.table({"image_id": ["a/1.jpg"], "label": [0], "width": [8], "height": [8],
                            "boxes": [[[0.0, 0.0, 4.0, 4.0]]], "scores": [[1.0]], "error": [""]}), str(output))
    (output / "classes.txt").write_text("a\nb\n")
    for name, classes in (("old", ["a", "b"]), ("new", ["b", "a"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "classifier.pt").write_bytes(b"")
        (tmp_path / name / "meta.json").write_text(json.dumps({"classes": classes}))
    earlier = MineConfig(input=str(tmp_path / "images"), output=str(output), weights=str(tmp_path / "old" / "classifier.pt"),
                         class_map=str(output / "classes.txt"))
    (output / "config.yaml").write_text(yaml.safe_dump(config_to_dict(earlier)))
    with pytest.raises(ValueError, match="other settings"):
        mine(MineConfig(input=str(tmp_path / "images"), output=str(output), weights=str(tmp_path / "new" / "classifier.pt")))
    assert (output / "classes.txt").read_text() == "a\nb\n"


def test_a_run_from_before_shape_policies_counts_as_exact_and_a_buckets_rerun_is_refused(tmp_path):
    import yaml

    from dap_ray.config import config_to_dict
    from dap_ray.steps.mine import mine

    (tmp_path / "images" / "a").mkdir(parents=True)
    output = tmp_path / "out"
    write_results(pa.table({"image_id": ["a/1.jpg"], "label": [0], "width": [8], "height": [8],
                            "boxes": [[[0.0, 0.0, 4.0, 4.0]]], "scores": [[1.0]], "error": [""]}), str(output))
    (tmp_path / "classes.txt").write_text("a\n")
    earlier = config_to_dict(MineConfig(input=str(tmp_path / "images"), output=str(output),
                                        class_map=str(tmp_path / "classes.txt")))
    del earlier["shapes"]
    (output / "config.yaml").write_text(yaml.safe_dump(earlier))
    with pytest.raises(ValueError, match=r"other settings \(shapes: 'exact' then, 'buckets' now\)"):
        mine(MineConfig(input=str(tmp_path / "images"), output=str(output), class_map=str(tmp_path / "classes.txt"),
                        shapes="buckets"))
