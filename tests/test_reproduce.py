"""The tuned loop of the reproduction (jobs/reproduce.py --tuned) end to end, in its tiniest form:
a 24-image sample with a random tiny classifier, every stage one or two trials or iterations. It
checks the chain (search -> mining -> pre-training -> a schedule per K and initialisation ->
the test split once), the caching of a rerun, the gain study over it and the tables; the numbers
mean nothing here. Minutes on 2 cores: the study tier, python -m pytest -m study, run by .ci/run."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    """A sample cache as the embedded default lays it out, every product tiny."""
    import torch

    from dap_ray.data.downstream_sample import DownstreamSampleConfig, make_downstream_sample
    from dap_ray.data.sample import SampleConfig, make_sample_dataset
    from tests.factories import tiny_resnet

    cache = tmp_path / "cache" / "sample-v1"
    make_sample_dataset(cache / "data", SampleConfig(num_images=24, num_classes=3, image_size=48))
    (cache / "classifier").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(tiny_resnet(num_classes=3).state_dict(), cache / "classifier" / "classifier.pt")
    (cache / "classifier" / "meta.json").write_text(json.dumps({"arch": "tests.factories:tiny_resnet",
                                                                 "num_classes": 3}))
    make_downstream_sample(cache / "downstream", DownstreamSampleConfig(num_train=16, num_test=4, num_classes=2,
                                                                        image_size=64))
    monkeypatch.setenv("DAP_RAY_CACHE", str(tmp_path / "cache"))
    return cache


@pytest.mark.study
def test_the_tuned_loop_runs_every_stage_once_and_a_rerun_finds_them_done(ray_session, tiny_cache, tmp_path):
    from dap_ray.steps.reproduce import ReproduceConfig, reproduce

    cfg = ReproduceConfig(output=str(tmp_path / "reproduction"), tuned=True, shots=("2",), iterations=(1,),
                          seeds=(0,), pretrain_iters=2, box_samples=2, kshot_samples=1,
                          kshot_iterations_range=(2, 2), kshot_lr_range=(0.01, 0.01))
    table = reproduce(cfg)
    folder = tmp_path / "reproduction" / "tuned"
    row = table["rows"]["2"]
    assert set(row) == {"CLS", "DAP", "DAP-CLS"}
    assert {k: row[label]["schedule"][k] for label in ("CLS", "DAP") for k in ("max_iters", "lr")} == {
        "max_iters": 2, "lr": pytest.approx(0.01)}
    assert len(row["DAP-CLS"]["AP"]["values"]) == 1
    # The chain: the mined boxes follow the searched setting, the DAP run pre-trained on them.
    best = yaml.safe_load((folder / "boxes" / "best.yaml").read_text())
    mine_config = yaml.safe_load((folder / "mined" / "config.yaml").read_text())
    assert mine_config["thresholds"] == best["thresholds"] and mine_config["nms_iou"] == best["nms_iou"]
    pretrained = yaml.safe_load((folder / "pretrained" / "config.yaml").read_text())
    assert pretrained["boxes"] == str(folder / "mined" / "boxes")
    assert table["box_search"]["report"]["best"]["images"] == 12  # half the 24 held out of the search
    for label in ("cls", "dap"):
        metrics = [json.loads(line) for line in (folder / f"{label}_2" / "metrics.jsonl").read_text().splitlines()]
        assert [m["iteration"] for m in metrics if "AP" in m] == [2]  # the test split once, at the end
    assert "| tuned | 2 | 2 it, lr 0.01 |" in (folder / "results.md").read_text()
    # Both searches ended over the same (one-point) ranges: neither is searched again, each keeps its own.
    for label in ("cls", "dap"):
        choice = json.loads((folder / f"kshot_{label}" / "k2_choice.json").read_text())
        assert choice["search"] == "k2" and choice["matched"] is None and choice["covering"] == {
            "max_iters": [2, 2], "lr": [pytest.approx(0.01), pytest.approx(0.01)]}
    assert "- K = 2, DAP: searched over max_iters [2, 2], lr [0.01, 0.01] (1 trial;" in (
        folder / "results.md").read_text()
    again = reproduce(cfg)  # every stage found done
    assert again["rows"] == table["rows"]
    # Another K later: K = 2's search and runs are reused, K = 3 gets its own, each written as it ends.
    searched = {label: (folder / f"kshot_{label}" / "k2" / "results.csv").read_text() for label in ("cls", "dap")}
    more = reproduce(dataclasses.replace(cfg, shots=("2", "3")))
    assert more["shots"] == ["2", "3"] and more["rows"]["2"] == table["rows"]["2"]
    assert {label: (folder / f"kshot_{label}" / "k2" / "results.csv").read_text() for label in ("cls", "dap")} == searched
    assert (folder / "kshot_dap" / "k3" / "kshot_preset.yaml").is_file()
    assert json.loads((folder / "results.json").read_text())["shots"] == ["2", "3"]

    from dap_ray.steps.study import GainStudyConfig, gain_study

    study = gain_study(GainStudyConfig(output=str(tmp_path / "reproduction"), shots=(2,), seeds=(0,), lengths=(),
                                       boxes=("searched", "true"), box_length=2))
    rows = study["rows"]["2"]
    # The searched boxes at the loop's length are the loop's own DAP run, fine-tuned once: the same numbers.
    assert rows["searched-2"]["AP"] == row["DAP"]["AP"] and rows["CLS"]["AP"] == row["CLS"]["AP"]
    assert rows["true-2"]["DAP-CLS"]["AP"]["values"] == [pytest.approx(rows["true-2"]["AP"]["values"][0]
                                                                       - row["CLS"]["AP"]["values"][0])]
    config = yaml.safe_load((folder.parent / "study" / "pretrained-true-2" / "config.yaml").read_text())
    assert config["boxes"].endswith("true_boxes/boxes") and config["max_iters"] == 2
    assert (folder.parent / "study" / "gain.png").is_file()
    assert "| 2 iterations on true boxes | 1.000 |" in (folder.parent / "study" / "results.md").read_text()


def _fake_search(outcomes: dict, calls: list):
    """A stand-in for the loop's k-shot search: ``outcomes[(init, folder name)]`` is the search's
    final iterations range (None: the one it was given), its best iterations and lr, its
    validation AP50 and, optionally, its final lr range. Writes the schedule file a search writes; records each call."""
    from dap_ray.search import SearchRange, edges_hit

    def search(init, where, k, iterations_range, lr_range, extend_rounds):
        calls.append((init, where.name, tuple(iterations_range), tuple(lr_range), extend_rounds))
        final, iters, lr, val, *final_lr = outcomes[(init, where.name)]
        final, final_lr = final or list(iterations_range), final_lr[0] if final_lr else list(lr_range)
        ranges = [SearchRange("max_iters", *final, limit_low=1, limit_high=4 * iterations_range[1], log=True,
                              integer=True), SearchRange("lr", *final_lr, limit_low=1e-5, limit_high=0.2, log=True)]
        best = {"max_iters": iters, "lr": lr, "val_AP50": val}
        where.mkdir(parents=True, exist_ok=True)
        (where / "kshot_preset.yaml").write_text(yaml.safe_dump({"shots": {k: {"max_iters": iters, "lr": lr}}}))
        return {"shots": {k: best}, "rounds": {k: [
            {"round": 1, "ranges": {r.name: [r.low, r.high] for r in ranges}, "trials": 6, "best_val_AP50": val,
             "edges": edges_hit(ranges, best)}]}}
    return search


LOOP_RANGE = [20, 160]


@pytest.mark.parametrize("outcomes, searched_again, chosen", [
    # Both searches ended over the loop's ranges: nothing to match.
    ({("cls", "k10"): (None, 62, 0.014, 40.2), ("dap", "k10"): (None, 69, 0.0075, 47.6)}, [], {}),
    # The loop at K = 10: CLS's search grew to 640 iterations, DAP's best lay inside 20-160. DAP is
    # searched again over 20-640, one round, and keeps the second search, which validated better.
    ({("cls", "k10"): ([20, 640], 359, 0.0038, 64.3), ("dap", "k10"): (None, 125, 0.027, 58.2),
      ("dap", "k10_matched"): ([20, 640], 543, 0.0207, 66.0)},
     [("dap", "k10_matched", (20, 640), (0.001, 0.04), 0)], {"DAP": "k10_matched"}),
    # The second search did worse: the first's schedule stays.
    ({("cls", "k10"): ([20, 640], 359, 0.0038, 64.3), ("dap", "k10"): (None, 125, 0.027, 58.2),
      ("dap", "k10_matched"): ([20, 640], 300, 0.001, 50.0)},
     [("dap", "k10_matched", (20, 640), (0.001, 0.04), 0)], {}),
    # The other way round: CLS fell short, and is searched again.
    ({("cls", "k10"): (None, 62, 0.014, 40.2), ("dap", "k10"): ([20, 640], 543, 0.0207, 66.0),
      ("cls", "k10_matched"): ([20, 640], 359, 0.0038, 64.3)},
     [("cls", "k10_matched", (20, 640), (0.001, 0.04), 0)], {"CLS": "k10_matched"}),
    # Each grew a range the other did not: both are searched again, over both grown ranges.
    ({("cls", "k10"): ([20, 640], 359, 0.0038, 64.3), ("dap", "k10"): (None, 125, 0.0011, 58.2, [2.5e-5, 0.04]),
      ("cls", "k10_matched"): ([20, 640], 300, 0.002, 60.0, [2.5e-5, 0.04]),
      ("dap", "k10_matched"): ([20, 640], 500, 0.001, 61.0, [2.5e-5, 0.04])},
     [("cls", "k10_matched", (20, 640), (2.5e-5, 0.04), 0), ("dap", "k10_matched", (20, 640), (2.5e-5, 0.04), 0)],
     {"DAP": "k10_matched"}),
])
def test_the_tuned_loop_searches_the_initialisation_whose_ranges_fell_short_again(outcomes, searched_again, chosen,
                                                                                tmp_path):
    from dap_ray.steps.reproduce import (
        ReproduceConfig,
        _kshot_schedules,
        _markdown_tuned,
        kshot_schedule_file,
        tuned_run_folder,
    )

    calls: list = []
    cfg = ReproduceConfig(output=str(tmp_path), tuned=True, shots=("10",), kshot_iterations_range=tuple(LOOP_RANGE))
    choices = _kshot_schedules(cfg, tmp_path, 10, {"CLS": "cls", "DAP": "dap"}, _fake_search(outcomes, calls))
    assert calls[:2] == [("cls", "k10", (20, 160), (0.001, 0.04), 1), ("dap", "k10", (20, 160), (0.001, 0.04), 1)]
    assert calls[2:] == searched_again
    for label in ("CLS", "DAP"):
        search = chosen.get(label, "k10")
        _, iters, lr, val, *_ = outcomes[(label.lower(), search)]
        assert {k: choices[label][k] for k in ("max_iters", "lr", "val_AP50", "search")} == {
            "max_iters": iters, "lr": lr, "val_AP50": val, "search": search}
        assert (choices[label]["matched"] is None) == ((label.lower(), "k10_matched") not in outcomes)
        # The fine-tunes and the gain study read the choice back: the schedule and a run folder of its own.
        assert kshot_schedule_file(tmp_path, label, 10) == tmp_path / f"kshot_{label.lower()}" / search / (
            "kshot_preset.yaml")
        assert tuned_run_folder(tmp_path, label, 10).name == f"{label.lower()}_10" + (
            "_matched" if search.endswith("_matched") else "")
    table = {"seeds": [0], "pretrain_iters": 400, "box_setting": {}, "box_search": {}, "inits": {"CLS": 0, "DAP": 0},
             "shots": ["10"], "schedules": {label: {"choices": {"10": choices[label]}} for label in choices},
             "rows": {"10": {**{label: {"schedule": choices[label], **{m: {"mean": 1.0, "std": 0.0} for m in
                                                                        ("AP", "AP50")}} for label in choices},
                             "DAP-CLS": {m: {"mean": 0.0, "std": 0.0} for m in ("AP", "AP50")}}}}
    text = _markdown_tuned(table, None)
    # A rerun finds the same choices (the searches are cached; here the stand-in answers the same).
    assert _kshot_schedules(cfg, tmp_path, 10, {"CLS": "cls", "DAP": "dap"}, _fake_search(outcomes, [])) == choices
    assert "| +0.0 ± 0.0 |" in text  # differences carry their sign
    assert ("then again over the ranges covering both" in text) == bool(searched_again)


def test_a_schedule_on_the_loops_limit_says_so(tmp_path):
    from dap_ray.steps.reproduce import ReproduceConfig, _kshot_schedules

    outcomes = {("cls", "k10"): ([20, 640], 359, 0.0038, 64.3), ("dap", "k10"): (None, 125, 0.027, 58.2),
                ("dap", "k10_matched"): ([20, 640], 635, 0.0207, 66.0)}
    cfg = ReproduceConfig(output=str(tmp_path), tuned=True, shots=("10",), kshot_iterations_range=tuple(LOOP_RANGE))
    choices = _kshot_schedules(cfg, tmp_path, 10, {"CLS": "cls", "DAP": "dap"}, _fake_search(outcomes, []))
    (edge,) = choices["DAP"]["edges"]
    assert edge["side"] == "high" and edge["note"] == (
        "the best max_iters 635 sits on the high edge of [20, 640], the loop's limit: not searched past it (a better "
        "schedule may lie beyond)")
    assert json.loads((tmp_path / "kshot_dap" / "k10_choice.json").read_text())["edges"] == [edge]


def test_the_gain_study_refuses_a_loop_that_chose_its_schedules_before_matching_them(tmp_path):
    from dap_ray.steps.study import GainStudyConfig, gain_study

    (tmp_path / "tuned").mkdir()
    old = {"inits": {"CLS": "cls:x", "DAP": "dap:y"}, "shots": ["5"], "rows": {"5": {}},
           "schedules": {"CLS": {"shots": {"5": {}}, "rounds": {}}, "DAP": {"shots": {"5": {}}, "rounds": {}}}}
    (tmp_path / "tuned" / "results.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"for K = \[5\] before it searched both initialisations over the same"):
        gain_study(GainStudyConfig(output=str(tmp_path), shots=(5,), seeds=(0,)))


@pytest.mark.parametrize("job, arguments, message", [
    ("reproduce.py", ["--tuned", "--shots", "all"], "at least one number in --shots"),
    ("gain_study.py", ["--output", "nowhere"], "run jobs/reproduce.py --tuned"),
    ("gain_study.py", ["--boxes", "mined"], "boxes must be some of"),
])
def test_the_loop_and_study_jobs_refuse_bad_input_by_name(job, arguments, message, tmp_path):
    result = subprocess.run([sys.executable, f"jobs/{job}", *arguments], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "DAP_RAY_CACHE": str(tmp_path)})
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
