"""The box sweep: its objective on hand-made cases, the CAM cache, the YAML mining takes, and resume."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dap_ray.localisation.boxes import BoxConfig
from dap_ray.localisation.sweep import CamCache, fingerprint, score_box_config
from tests.test_tracking import mlflow_runs

ROOT = Path(__file__).resolve().parents[1]


def cache_of(cams: list[np.ndarray], sizes: list[tuple[int, int]], labels: list[int]) -> CamCache:
    shapes = np.asarray([c.shape for c in cams], np.int32).reshape(-1, 2)
    counts = shapes[:, 0].astype(np.int64) * shapes[:, 1]
    return CamCache(image_ids=[f"im{i}.jpg" for i in range(len(cams))], labels=np.asarray(labels, np.int64),
                    sizes=np.asarray(sizes, np.int32).reshape(-1, 2), shapes=shapes,
                    offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                    values=np.concatenate([c.reshape(-1) for c in cams]).astype(np.float16) if cams
                    else np.zeros(0, np.float16), scale=64)


def ground_truth(boxes: dict[int, list[list[float]]], sizes, categories=("a", "b")) -> dict:
    """COCO truth: image i is im{i}.jpg; boxes xyxy, category 1."""
    annotations = []
    for image, image_boxes in boxes.items():
        for x1, y1, x2, y2 in image_boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image + 1, "category_id": 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    return {"images": [{"id": i + 1, "file_name": f"im{i}.jpg", "width": w, "height": h} for i, (w, h) in enumerate(sizes)],
            "annotations": annotations, "categories": [{"id": k + 1, "name": n} for k, n in enumerate(categories)]}


def blob(rows: int, cols: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    cam = np.zeros((rows, cols), np.float32)
    cam[r0:r1, c0:c1] = 1.0
    return cam


# A 2x2-cell map over a 64x64 image at scale 64: one cell is 32 pixels. A constant block of
# cells gives the box of its cells' rectangle (moment box of a uniform rectangle).
BOX_TABLE = [
    # (cams, truth boxes per image, expected AP50, expected corloc)
    ([], {}, None, None),  # no image: nothing to score
    ([blob(2, 2, 0, 1, 0, 1)], {0: [[0, 0, 32, 32]]}, 100.0, 1.0),  # the blob is the box
    ([blob(2, 2, 0, 1, 0, 1)], {0: [[32, 32, 64, 64]]}, 0.0, 0.0),  # the blob is elsewhere
    ([blob(2, 2, 0, 1, 0, 1), blob(2, 2, 1, 2, 1, 2)], {0: [[0, 0, 32, 32]], 1: [[0, 0, 32, 32]]}, 50.0, 0.5),
]


@pytest.mark.parametrize("cams, truth, ap50, corloc", BOX_TABLE)
def test_the_objective_on_hand_made_maps(cams, truth, ap50, corloc):
    sizes = [(64, 64)] * len(cams)
    cache = cache_of(cams, sizes, [0] * len(cams))
    config = BoxConfig.from_preset("paper", scale=64, thresholds=(0.5,))
    if not cams:
        with pytest.raises(ValueError, match="none of the cached images"):
            score_box_config(cache, cache.cams(), ground_truth(truth, sizes), config, [1, 2])
        return
    scores = score_box_config(cache, cache.cams(), ground_truth(truth, sizes), config, [1, 2])
    assert scores["AP50"] == pytest.approx(ap50, abs=0.5) and scores["corloc"] == pytest.approx(corloc)
    assert scores["images"] == len(cams) and scores["boxes_per_image"] == 1.0


def test_extra_boxes_cannot_raise_the_objective():
    """Any-hit rewards emitting more boxes; AP50 does not: a second, wrong, higher-scored box lowers it."""
    sizes = [(64, 64)] * 2
    truth = ground_truth({0: [[0, 0, 32, 32]], 1: [[0, 0, 32, 32]]}, sizes)
    one = cache_of([blob(2, 2, 0, 1, 0, 1), blob(2, 2, 0, 1, 0, 1)], sizes, [0, 0])
    config = BoxConfig.from_preset("paper", scale=64, thresholds=(0.5,))
    base = score_box_config(one, one.cams(), truth, config, [1, 2])
    cam = np.zeros((2, 2), np.float32)
    cam[0, 0], cam[1, :] = 1.0, 0.8  # the true cell, and a larger wrong blob at a lower threshold
    more = cache_of([cam, blob(2, 2, 0, 1, 0, 1)], sizes, [0, 0])
    two = score_box_config(more, more.cams(), truth, BoxConfig.from_preset("paper", scale=64, thresholds=(0.5, 0.9)),
                           [1, 2])
    assert two["boxes_per_image"] > base["boxes_per_image"] and two["any_hit"] == base["any_hit"] == 1.0
    assert two["AP50"] < base["AP50"]


def test_cam_cache_round_trip_and_key(tmp_path):
    cache = cache_of([blob(2, 3, 0, 1, 0, 2), np.full((4, 1), 0.25, np.float32)], [(96, 64), (32, 128)], [1, 0])
    cache.save(tmp_path / "cams.npz", "key-1")
    loaded = CamCache.load(tmp_path / "cams.npz", "key-1")
    assert loaded.image_ids == cache.image_ids and loaded.scale == 64 and loaded.values.dtype == np.float16
    for a, b in zip(loaded.cams(), cache.cams()):
        np.testing.assert_array_equal(a, b)
    assert CamCache.load(tmp_path / "cams.npz", "key-2") is None  # computed from something else
    assert CamCache.load(tmp_path / "missing.npz", "key-1") is None
    (tmp_path / "w.pt").write_bytes(b"a")
    first = fingerprint(weights=str(tmp_path / "w.pt"), scales=[1, 2])
    (tmp_path / "w.pt").write_bytes(b"ab")  # new weights at the same path
    assert fingerprint(weights=str(tmp_path / "w.pt"), scales=[1, 2]) != first


def test_the_best_setting_is_a_config_that_mining_takes_as_it_is(tmp_path):
    from dap_ray.config import resolve_config
    from dap_ray.steps.mine import MineConfig
    from dap_ray.steps.tune import TuneBoxesConfig, _write_outputs

    rows = [{"thresholds": t, "nms_iou": n, "preset": p, "size_measure": s, "AP50": ap, "AP": 1.0, "VOC_AP50": 1.0,
             "corloc": 0.5, "any_hit": 0.5, "mean_best_iou": 0.5, "boxes_per_image": 2.0, "images": 10}
            for t, n, p, s, ap in (("0.2,0.3,0.4,0.5", 0.8, "official", "rectangle", 30.0),
                                   ("0.1,0.2", 0.6, "paper", "cells", 41.5))]
    summary = _write_outputs(TuneBoxesConfig(), tmp_path, rows, errors=0, trials=2)
    assert summary["gain_AP50"] == pytest.approx(11.5) and summary["best"]["thresholds"] == "0.1,0.2"
    cfg = resolve_config(MineConfig, argparse.Namespace(config=str(tmp_path / "best.yaml")))
    assert cfg.box_config() == BoxConfig.from_preset("paper", scale=576, thresholds=(0.1, 0.2), nms_iou=0.6,
                                                     size_measure="cells")
    assert "| 2* |" in (tmp_path / "results.md").read_text()  # the default, marked
    assert (tmp_path / "results.csv").read_text().count("\n") == 3 and (tmp_path / "sweep.png").is_file()


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory):
    import torch

    from dap_ray.data.sample import SampleConfig, make_sample_dataset
    from tests.factories import tiny_resnet

    root = tmp_path_factory.mktemp("sweep")
    sample = make_sample_dataset(root / "sample", SampleConfig(num_images=12, num_classes=3, image_size=48))
    torch.manual_seed(0)
    torch.save(tiny_resnet(num_classes=3).state_dict(), root / "w.pt")
    return sample, root / "w.pt"


def sweep_command(sample: Path, weights: Path, output: Path) -> list[str]:
    return [sys.executable, "jobs/tune_boxes.py", "--gt-boxes", str(sample / "gt_boxes.json"),
            "--images", str(sample / "images"), "--classifier", "tests.factories:tiny_resnet", "--weights",
            str(weights), "--class-map", str(sample / "classes.txt"), "--scales", "32", "64", "--output", str(output),
            "--threshold-sets", "0.2,0.3,0.4,0.5", "0.3,0.5", "--nms-ious", "0.5", "0.8", "--presets", "official",
            "--size-measures", "rectangle", "cells", "--max-concurrent-trials", "1", "--search", "grid",
            "--report-fraction", "0"]


def finished_trials(output: Path) -> dict[str, float]:
    """trial directory -> the timestamp of its result, for every trial that reported."""
    found = {}
    for result in (output / "ray" / "boxes").glob("*/result.json"):
        lines = [line for line in result.read_text().splitlines() if line.strip()]
        if lines:
            found[result.parent.name] = json.loads(lines[-1])["timestamp"]
    return found


def terminated_trial_ids(output: Path) -> set[str]:
    """Ids of the trials that Tune's last saved experiment state records as finished. A trial that
    has reported but is not recorded yet (killed in between) is run again on resume, by design."""
    states = sorted((output / "ray" / "boxes").glob("experiment_state*.json"))
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError, KeyError):  # being rewritten at this moment
        return set()
    recorded = (json.loads(trial[0]) for trial in trials)
    return {state["trial_id"] for state in recorded if state["status"] == "TERMINATED"}


@pytest.mark.resume
def test_a_killed_sweep_resumes_without_redoing_finished_trials(sweep_inputs, tmp_path):
    sample, weights = sweep_inputs
    output = tmp_path / "sweep"
    env = {**os.environ, "RAY_ADDRESS": ""}
    process = subprocess.Popen(sweep_command(sample, weights, output), cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(terminated_trial_ids(output)) < 2 and process.poll() is None:
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    terminated = terminated_trial_ids(output)
    before = {name: stamp for name, stamp in finished_trials(output).items() if any(t in name for t in terminated)}
    assert 2 <= len(before), "the sweep ended before any trial finished"
    assert not (output / "best.yaml").exists() or len(before) == 8
    rerun = subprocess.run(sweep_command(sample, weights, output), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = finished_trials(output)
    assert len(after) == 8  # 2 threshold sets x 2 NMS IoUs x 2 size rules, the default among them
    assert all(after[name] == stamp for name, stamp in before.items())  # finished trials were not run again
    counts = [int(line.split("/")[0].removeprefix("box grid: ")) for line in rerun.stdout.splitlines()
              if line.startswith("box grid: ")]
    assert counts == list(range(len(terminated) + 1, 9)), rerun.stdout[-2000:]  # counted on from the kept ones
    assert "using the cached CAMs" in rerun.stdout
    best = yaml.safe_load((output / "best.yaml").read_text())
    assert set(best) == {"thresholds", "nms_iou", "preset", "size_measure"}
    rows = (output / "results.csv").read_text().splitlines()
    assert len(rows) == 9 and rows[0].startswith('"thresholds"')


def test_the_k_shot_sweep_writes_a_preset_that_finetune_reads(ray_session, tmp_path):
    """Two schedules for K = 2 on a tiny downstream set, validated on images the draw left out."""
    from dap_ray.data.downstream_sample import DownstreamSampleConfig, make_downstream_sample
    from dap_ray.steps.finetune import FinetuneConfig, resolve_schedule
    from dap_ray.steps.tune import TuneFinetuneConfig, tune_finetune

    data = make_downstream_sample(tmp_path / "data", DownstreamSampleConfig(num_train=20, num_test=2, num_classes=2,
                                                                           image_size=64))
    cfg = TuneFinetuneConfig(train=str(data / "coco" / "train.json"), train_images=str(data / "images"),
                             init="scratch", backbone="tests.factories:tiny_resnet", output=str(tmp_path / "sweep"),
                             shots=(2,), iterations=(2, 4), lrs=(0.01,), val_images=4, evals_per_trial=2, min_sizes=(48,),
                             max_size=96, roi_batch_size_per_image=16, test_proposals=50, max_concurrent_trials=1,
                             search="grid", mlflow_uri="local")
    summary = tune_finetune(cfg)
    assert len(summary["trials"]) == 2 and set(summary["shots"]) == {2}
    chosen = summary["shots"][2]
    preset = yaml.safe_load((tmp_path / "sweep" / "kshot_preset.yaml").read_text())
    assert preset["shots"][2] == {"max_iters": chosen["max_iters"], "lr": 0.01} and preset["global_batch"] == 2
    resolved = resolve_schedule(FinetuneConfig(shots=2, batch_size=1, kshot_table=str(tmp_path / "sweep" /
                                                                                       "kshot_preset.yaml")), 4)
    assert resolved.max_iters == chosen["max_iters"] * 2 and resolved.lr == pytest.approx(0.005)  # batch 2 -> 1
    with pytest.raises(ValueError, match="no entry for K = 5"):
        resolve_schedule(FinetuneConfig(shots=5, kshot_table=str(tmp_path / "sweep" / "kshot_preset.yaml")), 4)
    assert (tmp_path / "sweep" / "sweep.png").is_file() and "| 2 |" in (tmp_path / "sweep" / "results.md").read_text()
    runs = mlflow_runs(f"sqlite:///{(tmp_path / 'sweep').resolve()}/mlflow.db", "tune_finetune")
    parent = runs[runs["tags.mlflow.parentRunId"].isna()]
    assert len(runs) == 3 and len(parent) == 1  # the sweep, and one child per trial
    assert parent.iloc[0]["metrics.final/K2/max_iters"] == chosen["max_iters"]


def test_the_concurrency_limit_reaches_the_grid_generator():
    """Regression: max_concurrent_trials beside a BasicVariantGenerator is ignored by Tune (a warning),
    so trials that leave CPUs to their Ray Train workers all started at once."""
    from dap_ray.steps.tune import grid_tune_config

    config = grid_tune_config(2, seed=3)
    assert config.max_concurrent_trials is None and config.search_alg.max_concurrent == 2
    assert (config.metric, config.mode) == ("AP50", "max")


def test_trial_lines_restored_from_a_sweeps_state_time_only_their_own_trials(capsys):
    """Regression: Tune pickles a sweep's callbacks into tuner.pkl. The callback was a class defined
    in a function, pickled with its code, so a sweep resumed after an upgrade ran the old callback
    against the new Progress, and its AttributeError turned each finished trial into an errored one
    that ran again. It must pickle by name (plain pickle refuses code), and a restored one starts
    its own clock with the trials already finished counted as done before it."""
    import pickle
    from types import SimpleNamespace

    from dap_ray.steps.tune_callbacks import TrialLines

    trials = [SimpleNamespace(status=s) for s in ("TERMINATED", "ERROR", "RUNNING", "PENDING")]
    first = TrialLines(4, "K = 5, round 1")
    first.on_step_begin(0, trials[:1])
    restored = pickle.loads(pickle.dumps(first))
    restored.on_step_begin(0, trials)
    time.sleep(0.2)
    restored.on_trial_complete(1, trials, trials[2])
    line = capsys.readouterr().out.strip()
    assert line.startswith("K = 5, round 1: 3/4 trials (75%), "), line
    rate = float(line.split(", ")[2].removesuffix(" trials/s"))
    assert 0 < rate <= 1 / 0.2  # one trial finished in this process, in at least 0.2 s


def test_the_box_search_tries_the_papers_setting_first_and_reports_on_held_out_images(ray_session, sweep_inputs,
                                                                                      tmp_path):
    from dap_ray.steps.tune import TuneBoxesConfig, tune_boxes

    sample, weights = sweep_inputs
    cfg = TuneBoxesConfig(gt_boxes=str(sample / "gt_boxes.json"), images=str(sample / "images"),
                          classifier="tests.factories:tiny_resnet", weights=str(weights),
                          class_map=str(sample / "classes.txt"), scales=(32, 64), output=str(tmp_path / "search"),
                          samples=3, extend_rounds=1, max_concurrent_trials=1, threshold_count_range=(3, 4),
                          mlflow_uri="local")
    summary = tune_boxes(cfg)
    assert summary["search"] == "optuna" and summary["default"]["thresholds"] == "0.2,0.3,0.4,0.5"
    # Selected on 6 images, reported on the other 6, both written.
    assert summary["best"]["images"] == 6 and summary["report"]["best"]["images"] == 6
    assert summary["report_gain_AP50"] == pytest.approx(summary["report"]["best"]["AP50"]
                                                        - summary["report"]["default"]["AP50"])
    rounds = summary["rounds"]
    assert rounds[0]["trials"] == 3 and summary["scored"] == sum(r["trials"] for r in rounds)
    for before, after in zip(rounds, rounds[1:]):  # a further round only over grown ranges
        assert any(hit["growable"] for hit in before["edges"])
        assert all(after["ranges"][n][0] <= low and high <= after["ranges"][n][1]
                   for n, (low, high) in before["ranges"].items()) and after["ranges"] != before["ranges"]
    assert all(hit["action"] for hit in summary["edges"])
    text = (tmp_path / "search" / "results.md").read_text()
    assert "Held out of the search (6 images" in text and "round 1: 3 trials" in text
    best = yaml.safe_load((tmp_path / "search" / "best.yaml").read_text())
    assert set(best) == {"thresholds", "nms_iou", "preset", "size_measure"} and 1 <= len(best["thresholds"]) <= 8
    runs = mlflow_runs(f"sqlite:///{(tmp_path / 'search').resolve()}/mlflow.db", "tune_boxes")
    assert len(runs) == 1 + summary["scored"]  # the sweep and each trial
    parent = runs[runs["tags.mlflow.parentRunId"].isna()].iloc[0]
    assert parent["metrics.final/held_out/best/AP50"] == pytest.approx(summary["report"]["best"]["AP50"])


def test_a_batched_search_proposes_only_once_its_whole_batch_has_ended():
    """What the box search relies on to rerun the same with several trials at a time: no setting is
    proposed while a trial of the batch runs, so proposals never hang on which trial ended first."""
    from dap_ray.search import SearchRange
    from dap_ray.steps.tune import _search_tune_config

    ranges = [SearchRange("nms_iou", 0.5, 0.9, limit_low=0.5, limit_high=0.9)]
    limiter = _search_tune_config(ranges, {}, "AP50", samples=6, concurrent=2, seed=0, batch=True).search_alg
    assert limiter.suggest("a") and limiter.suggest("b") and limiter.suggest("c") is None
    limiter.on_trial_complete("b", {"AP50": 1.0, "nms_iou": 0.6})
    assert limiter.suggest("c") is None  # "a" still runs
    limiter.on_trial_complete("a", {"AP50": 2.0, "nms_iou": 0.7})
    assert limiter.suggest("c") and limiter.suggest("d") and limiter.suggest("e") is None
    unbatched = _search_tune_config(ranges, {}, "AP50", samples=6, concurrent=2, seed=0).search_alg
    assert unbatched.suggest("a") and unbatched.suggest("b")
    unbatched.on_trial_complete("b", {"AP50": 1.0, "nms_iou": 0.6})
    assert unbatched.suggest("c")  # proposed on what ended first


def _halving(*trials):
    from types import SimpleNamespace

    from dap_ray.steps.tune_callbacks import BatchHalving

    scheduler = BatchHalving(time_attr="progress", max_t=100, grace_period=25, reduction_factor=2)
    assert scheduler.set_search_properties("AP50", "max") and scheduler.rungs == [25.0, 50.0]
    return scheduler, [SimpleNamespace(trial_id=t) for t in trials]


def _report(scheduler, trial, progress, ap50) -> str:
    return scheduler.on_trial_result(None, trial, {"progress": progress, "AP50": ap50})


# (the earlier batch's AP50 at 25% of their schedules, this trial's, whether it is stopped there)
HALVING_TABLE = [
    ([], 0.0, False),              # the first batch is judged by no one
    ([10.0, 20.0], 5.0, True),     # under the median of the earlier batch
    ([10.0, 20.0], 16.0, False),   # over it
    ([10.0, float("nan")], 5.0, True),  # a trial that reported no number is left out
    ([20.0], float("nan"), False),  # nor is a number missing taken for the worst
]


@pytest.mark.parametrize("earlier, mine, stopped", HALVING_TABLE)
def test_batch_halving_judges_a_trial_by_the_trials_ended_before_it_began(earlier, mine, stopped):
    from ray.tune.schedulers import TrialScheduler

    scheduler, trials = _halving(*[f"e{i}" for i in range(len(earlier))], "t")
    for trial, value in zip(trials, earlier):
        scheduler.on_trial_add(None, trial)
        _report(scheduler, trial, 25, value)
        scheduler.on_trial_complete(None, trial, {"progress": 100, "AP50": value})
    scheduler.on_trial_add(None, trials[-1])
    assert (_report(scheduler, trials[-1], 25, mine) == TrialScheduler.STOP) is stopped


def test_batch_halving_decides_the_same_whichever_trial_of_a_batch_reports_first():
    """ASHA judges a trial by the trials that reached the rung before it, so in a batch the slower
    of two trials is judged by the faster, and which is faster is timing. BatchHalving judges both
    by the batch before them only: the same decisions in either order."""
    import pickle

    from ray.tune.schedulers import TrialScheduler

    decisions = []
    for order in ((0, 1), (1, 0)):
        scheduler, (first, a, b) = _halving("first", "a", "b")
        scheduler.on_trial_add(None, first)
        _report(scheduler, first, 25, 10.0)
        scheduler.on_trial_complete(None, first, {"progress": 100, "AP50": 12.0})
        scheduler = pickle.loads(pickle.dumps(scheduler))  # it pickles (Tune pickles it into tuner.pkl)
        scheduler.on_trial_add(None, a)
        scheduler.on_trial_add(None, b)
        values = {a.trial_id: 30.0, b.trial_id: 8.0}
        batch = [a, b]
        decisions.append({batch[i].trial_id: _report(scheduler, batch[i], 25, values[batch[i].trial_id])
                          for i in order})
    assert decisions[0] == decisions[1] == {"a": TrialScheduler.CONTINUE, "b": TrialScheduler.STOP}
    # A result past several rungs at once is recorded at each, and judged at each.
    scheduler, (first, late) = _halving("first", "late")
    scheduler.on_trial_add(None, first)
    _report(scheduler, first, 25, 10.0)
    _report(scheduler, first, 50, 20.0)
    scheduler.on_trial_complete(None, first, {"progress": 100, "AP50": 20.0})
    scheduler.on_trial_add(None, late)
    assert _report(scheduler, late, 50, 15.0) == TrialScheduler.STOP and set(scheduler.records["late"]) == {25.0, 50.0}
    # A trial at the end of its schedule is stopped, as ASHA does, however good (Tune marks it done).
    scheduler.on_trial_add(None, first)
    assert _report(scheduler, first, 100, 99.0) == TrialScheduler.STOP


def test_batch_halving_retries_a_failed_trial_with_the_judges_it_began_with():
    """Tune tells of a failed trial's error, then adds it again to retry it: by then a trial of its
    batch may have ended (timing), and the failed one is among the ended. Neither may judge it."""
    from ray.tune.schedulers import TrialScheduler

    scheduler, (a, b, mate, retried) = _halving("a", "b", "mate", "retried")
    for trial, value in ((a, 10.0), (b, 20.0)):
        scheduler.on_trial_add(None, trial)
        _report(scheduler, trial, 25, value)
        scheduler.on_trial_complete(None, trial, {"progress": 100, "AP50": value})
    scheduler.on_trial_add(None, mate)
    scheduler.on_trial_add(None, retried)
    assert _report(scheduler, retried, 25, 16.0) == TrialScheduler.CONTINUE  # over the median of 10 and 20
    scheduler.on_trial_error(None, retried)
    _report(scheduler, mate, 25, 1.0)
    scheduler.on_trial_complete(None, mate, {"progress": 100, "AP50": 1.0})
    scheduler.on_trial_add(None, retried)
    assert scheduler.judged_by["retried"] == ("a", "b") and "retried" not in scheduler.ended
    # Under the median of a's and b's 10 and 20 at 50%: stopped. Had its batch-mate's 1.0 counted, it would pass.
    assert _report(scheduler, retried, 50, 12.0) == TrialScheduler.STOP
    scheduler.on_trial_complete(None, retried, {"progress": 50, "AP50": 12.0})
    assert scheduler.ended == ["a", "b", "mate", "retried"]


def test_batch_halving_judges_a_resumed_sweep_as_it_would_have_run_on(tmp_path):
    """Tune pickles the scheduler as a sweep begins and restores that empty copy: the records come
    back from the state file. A trial resumed keeps the judges it began with, not its batch-mate that
    finished before the interruption; one restarted after an error (a new id) takes its place."""
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from dap_ray.steps.tune_callbacks import BatchHalving

    def trial(name, status="PENDING"):
        return SimpleNamespace(trial_id=name, status=status, config={"max_iters": len(name), "lr": name})

    state = tmp_path / "sweep" / "batch_halving.json"
    scheduler = BatchHalving(time_attr="progress", max_t=100, grace_period=25, state_file=str(state))
    scheduler.set_search_properties("AP50", "max")
    as_begun = pickle.dumps(scheduler)
    for name, value in (("a", 10.0), ("b", 20.0)):
        scheduler.on_trial_add(None, trial(name))
        _report(scheduler, trial(name), 25, value)
        scheduler.on_trial_complete(None, trial(name), {"progress": 100, "AP50": value})
    for name in ("mate", "resumed", "failed"):
        scheduler.on_trial_add(None, trial(name))
    _report(scheduler, trial("mate"), 25, 1.0)
    scheduler.on_trial_complete(None, trial("mate"), {"progress": 100, "AP50": 1.0})
    scheduler.on_trial_error(None, trial("failed"))
    # The driver dies here. Tune restores the scheduler pickled as the sweep began and adds its trials
    # again, the finished ones as finished, most recent first; the failed one restarted as "again".
    restored = pickle.loads(as_begun)
    assert restored.records == {} and state.is_file()
    for name, status in (("mate", "TERMINATED"), ("resumed", "PENDING"), ("b", "TERMINATED"), ("a", "TERMINATED")):
        restored.on_trial_add(None, trial(name, status))
    again = SimpleNamespace(trial_id="again", status="PENDING", config=trial("failed").config)
    restored.on_trial_add(None, again)
    assert restored.judged_by["resumed"] == restored.judged_by["again"] == ("a", "b")
    assert restored.ended == ["a", "b", "mate"] and restored.records["b"] == {25.0: 20.0, 50.0: 20.0}
    # 12 is under the median of a's and b's 10 and 20; had mate's 1.0 counted, it would pass.
    assert _report(restored, trial("resumed"), 25, 12.0) == TrialScheduler.STOP
    assert _report(restored, again, 25, 12.0) == TrialScheduler.STOP
    # A sweep begun by an older dap_ray restores a scheduler pickled without the state file.
    old = pickle.loads(as_begun)
    old.__dict__ = {k: v for k, v in old.__dict__.items()
                    if k not in ("max_t", "configs", "errored", "state_file", "_read")}
    older = pickle.loads(pickle.dumps(old))
    older.on_trial_add(None, trial("c"))
    assert older.judged_by == {"c": ()} and older.state_file is None
    assert _report(older, trial("c"), 100, 5.0) == TrialScheduler.CONTINUE  # that version let trials end themselves


def test_batch_halving_resumes_from_a_file_ahead_of_tunes_saved_state(tmp_path):
    """The file is written at once and Tune's state every few seconds: a trial stopped at a rung may
    come back unfinished, and one that began and ended may not come back at all (the restored
    searcher proposes it again under a new id). The first is stopped again at that rung, the
    second judges no one."""
    import math
    import pickle
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from dap_ray.steps.tune_callbacks import BatchHalving

    def trial(name, status="PENDING"):
        return SimpleNamespace(trial_id=name, status=status, config={"name": name})

    state = tmp_path / "batch_halving.json"
    scheduler = BatchHalving(time_attr="progress", max_t=100, grace_period=25, state_file=str(state))
    scheduler.set_search_properties("AP50", "max")
    as_begun = pickle.dumps(scheduler)
    for name, value in (("a", 10.0), ("b", 20.0), ("c", float("nan"))):
        scheduler.on_trial_add(None, trial(name))
        _report(scheduler, trial(name), 25, value)
        scheduler.on_trial_complete(None, trial(name), {"progress": 100, "AP50": value})
    scheduler.on_trial_add(None, trial("stopped"))
    assert _report(scheduler, trial("stopped"), 25, 5.0) == TrialScheduler.STOP
    scheduler.on_trial_add(None, trial("ghost"))
    _report(scheduler, trial("ghost"), 25, 0.0)
    scheduler.on_trial_complete(None, trial("ghost"), {"progress": 25, "AP50": 0.0})
    # Tune's last save had a, b and c finished and "stopped" still running, and never saw "ghost".
    restored = pickle.loads(as_begun)
    for name, status in (("stopped", "PENDING"), ("c", "TERMINATED"), ("b", "TERMINATED"), ("a", "TERMINATED")):
        restored.on_trial_add(None, trial(name, status))
    assert _report(restored, trial("stopped"), 25, 30.0) == TrialScheduler.STOP  # its first value there, 5.0
    assert math.isnan(restored.records["c"][25.0])
    restored.on_trial_add(None, trial("new"))
    assert "ghost" not in restored.ended and "ghost" not in restored.records
    assert restored.judged_by["new"] == ("a", "b", "c")
    assert json.loads(state.read_text())["judged_by"]["new"] == ["a", "b", "c"]  # and written back


@pytest.mark.parametrize("grace, max_t, factor", [(0, 100, 2), (200, 100, 2), (25, 100, 1)])
def test_batch_halving_refuses_rungs_it_cannot_place(grace, max_t, factor):
    from dap_ray.steps.tune_callbacks import BatchHalving

    with pytest.raises(ValueError, match="grace_period"):
        BatchHalving(time_attr="progress", max_t=max_t, grace_period=grace, reduction_factor=factor)


@pytest.mark.resume
def test_the_k_shot_search_reruns_the_same_with_two_trials_at_a_time(ray_session, tmp_path):
    """Proposals in batches and BatchHalving: a second run of the same search, two trials at a time,
    tries the same schedules, runs each as far, and chooses the same. At this size timing rarely
    changes the order trials end in and halving may stop none (one rung, at 50%), so this guards
    the wiring; the order independence itself is tested on the limiter and the scheduler above. In
    the resume tier for its minute."""
    from dap_ray.data.downstream_sample import DownstreamSampleConfig, make_downstream_sample
    from dap_ray.steps.tune import TuneFinetuneConfig, tune_finetune

    data = make_downstream_sample(tmp_path / "data", DownstreamSampleConfig(num_train=20, num_test=2, num_classes=2,
                                                                           image_size=64))
    runs = []
    for name in ("first", "second"):
        cfg = TuneFinetuneConfig(train=str(data / "coco" / "train.json"), train_images=str(data / "images"),
                                 init="scratch", backbone="tests.factories:tiny_resnet", output=str(tmp_path / name),
                                 shots=(2,), iterations_range=(2, 8), lr_range=(0.005, 0.02), samples=4,
                                 extend_rounds=0, val_images=4, evals_per_trial=2, min_sizes=(48,), max_size=96,
                                 roi_batch_size_per_image=16, test_proposals=50, max_concurrent_trials=2)
        summary = tune_finetune(cfg)
        runs.append((sorted((t["max_iters"], t["lr"], t["iterations_run"], t["val_AP50"]) for t in summary["trials"]),
                     summary["shots"][2]))
    assert len(runs[0][0]) == 4 and runs[0] == runs[1]


def test_the_k_shot_search_grows_a_range_its_best_sits_on(ray_session, tmp_path):
    from dap_ray.data.downstream_sample import DownstreamSampleConfig, make_downstream_sample
    from dap_ray.steps.tune import TuneFinetuneConfig, tune_finetune

    data = make_downstream_sample(tmp_path / "data", DownstreamSampleConfig(num_train=20, num_test=2, num_classes=2,
                                                                           image_size=64))
    cfg = TuneFinetuneConfig(train=str(data / "coco" / "train.json"), train_images=str(data / "images"),
                             init="scratch", backbone="tests.factories:tiny_resnet", output=str(tmp_path / "sweep"),
                             shots=(2,), iterations_range=(2, 3), lr_range=(0.005, 0.02), samples=2, extend_rounds=1,
                             val_images=4, evals_per_trial=1, min_sizes=(48,), max_size=96,
                             roi_batch_size_per_image=16, test_proposals=50, max_concurrent_trials=1)
    summary = tune_finetune(cfg)
    rounds = summary["rounds"][2]
    # Any best of [2, 3] sits on an edge, and both can grow (to [1, 3] or [2, 5]; the hard limits are 1 and 12).
    first = rounds[0]
    assert first["ranges"]["max_iters"] == [2, 3] and any(h["name"] == "max_iters" for h in first["edges"])
    assert len(rounds) == 2 and rounds[1]["trials"] == 1 and len(summary["trials"]) == 3
    assert rounds[1]["ranges"]["max_iters"] != [2, 3]
    chosen = summary["shots"][2]
    preset = yaml.safe_load((tmp_path / "sweep" / "kshot_preset.yaml").read_text())
    assert preset["shots"][2] == {"max_iters": chosen["max_iters"], "lr": chosen["lr"]}
    assert 0.005 / 20 <= chosen["lr"] <= 0.2 and "round 2" in (tmp_path / "sweep" / "results.md").read_text()
    # Each round's halving records sit in its sweep's folder, for a resume to read back.
    states = sorted((tmp_path / "sweep").rglob("batch_halving.json"))
    assert [p.parent.name for p in states] == ["finetune_k2", "finetune_k2_round1"]
    assert [len(json.loads(p.read_text())["ended"]) for p in states] == [2, 1]
