"""The contact sheet (jobs/visualize.py): which images it shows, true boxes beside the pseudo
ones, worst first on request; drawn and read back as a PNG."""

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from dap_ray.data.export import best_iou, contact_sheet, pick_rows

ROOT = Path(__file__).resolve().parents[1]
BOX = np.array([[10, 10, 30, 30]], np.float32)


def row(image_id: str, boxes=BOX, label: int = 0) -> dict:
    return {"image_id": image_id, "label": label, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "scores": np.linspace(1, 0.5, len(np.asarray(boxes).reshape(-1, 4))).astype(np.float32)}


@pytest.mark.parametrize("boxes, truth, expected", [
    (np.zeros((0, 4)), BOX, 0.0),
    (BOX, np.zeros((0, 4)), 0.0),
    (BOX, BOX, 1.0),
    (np.array([[0, 0, 5, 5], [10, 10, 30, 20]]), BOX, 0.5),  # the better of the two
])
def test_best_iou(boxes, truth, expected):
    assert best_iou(np.asarray(boxes, np.float32), np.asarray(truth, np.float32)) == pytest.approx(expected)


ROWS = [row("a"), row("b", [[0, 0, 5, 5]]), row("c", np.zeros((0, 4))), row("d", [[10, 10, 30, 20]]), row("e")]
TRUTH = {k: BOX for k in "abcd"}  # e has no true box


@pytest.mark.parametrize("num, order, seed, ids, expected", [
    (3, "file", 0, (), ["a", "b", "c"]),
    (2, "file", 0, (), ["a", "c"]),  # spread over the run
    (3, "worst", 0, (), ["b", "c", "d"]),  # IoU 0 (b and c, by id), then 0.5; e has no truth
    (5, "random", 7, ("d", "a"), ["d", "a"]),  # ids win, in their order
])
def test_pick_rows(num, order, seed, ids, expected):
    assert [r["image_id"] for r in pick_rows(ROWS, num, order, seed, ids, TRUTH)] == expected


def test_random_picks_rerun_the_same_and_bad_picks_are_named():
    first = pick_rows(ROWS, 3, "random", seed=4)
    assert [r["image_id"] for r in first] == [r["image_id"] for r in pick_rows(ROWS, 3, "random", seed=4)]
    with pytest.raises(ValueError, match="needs --gt-boxes"):
        pick_rows(ROWS, 3, "worst")
    with pytest.raises(ValueError, match=r"--ids not in the mining run: \['zz'\]"):
        pick_rows(ROWS, 3, ids=("a", "zz"))
    with pytest.raises(ValueError, match="order must be"):
        pick_rows(ROWS, 3, order="best")


def test_the_sheet_draws_true_boxes_in_green_and_a_legend():
    image = np.zeros((64, 64, 3), np.uint8)
    plain = contact_sheet([row("a", [[0, 0, 8, 8]])], [image], columns=1)
    shown = contact_sheet([row("a", [[0, 0, 8, 8]])], [image], columns=1, truth={"a": np.array([[30, 30, 60, 60]])},
                          class_names=["disc"])
    assert shown.shape == plain.shape == (22 + 256, 256, 3)
    green = (shown[..., 1] > 200) & (shown[..., 0] < 50) & (shown[..., 2] < 50)
    assert green[22:].any() and not ((plain[..., 1] > 200) & (plain[..., 0] < 50) & (plain[..., 2] < 50))[22:].any()


def test_the_job_shows_the_worst_images_first(pseudo_run, tmp_path):
    boxes, sample, _ = pseudo_run  # the true boxes stand in for mined ones; two images have none
    output = tmp_path / "worst.png"
    done = subprocess.run([sys.executable, "jobs/visualize.py", "--boxes", str(boxes), "--output", str(output),
                           "--gt-boxes", str(sample / "gt_boxes.json"), "--order", "worst", "--num", "4", "--no-cam"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    sheet = cv2.imread(str(output))
    assert sheet.shape == (22 + 256, 4 * 256, 3)
    assert yaml.safe_load(output.with_suffix(".yaml").read_text())["order"] == "worst"
    bad = subprocess.run([sys.executable, "jobs/visualize.py", "--boxes", str(boxes), "--output", str(output),
                          "--order", "worst", "--no-cam"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--order worst needs --gt-boxes" in bad.stderr and "Traceback" not in bad.stderr
