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


@pytest.mark.parametrize("job, arguments, message", [
    ("reproduce.py", ["--tuned", "--shots", "all"], "at least one number in --shots"),
    ("gain_study.py", ["--output", "nowhere"], "run jobs/reproduce.py --tuned"),
    ("gain_study.py", ["--boxes", "mined"], "boxes must be some of"),
])
def test_the_loop_and_study_jobs_refuse_bad_input_by_name(job, arguments, message, tmp_path):
    result = subprocess.run([sys.executable, f"jobs/{job}", *arguments], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "DAP_RAY_CACHE": str(tmp_path)})
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
