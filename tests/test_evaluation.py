import numpy as np
import pytest

from dap_ray.evaluation.localisation import (
    box_iou,
    centre_baseline,
    localisation_quality,
    whole_image_baseline,
)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 0))),
        ([[0, 0, 10, 10]], [[0, 0, 10, 10]], [[1.0]]),
        ([[0, 0, 10, 10]], [[5, 0, 15, 10]], [[1 / 3]]),
        ([[0, 0, 10, 10]], [[20, 20, 30, 30], [0, 0, 0, 0]], [[0.0, 0.0]]),
    ],
)
def test_box_iou(a, b, expected):
    np.testing.assert_allclose(box_iou(np.array(a, float), np.array(b, float)), expected)


def test_localisation_quality_by_hand():
    truth = {"a": np.array([[0, 0, 10, 10]]), "b": np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), "c": np.array([[0, 0, 4, 4]])}
    predictions = {
        "a": (np.array([[0, 0, 10, 10], [0, 0, 2, 2]]), np.array([1.0, 0.2])),  # top hit
        "b": (np.array([[0, 0, 30, 30], [50, 50, 60, 61]]), np.array([1.0, 0.5])),  # top misses, second hits
        "c": (np.zeros((0, 4)), np.zeros(0)),  # no boxes: a miss
    }
    q = localisation_quality(predictions, truth)
    assert q["images"] == 3
    assert q["corloc"] == pytest.approx(1 / 3)
    assert q["any_hit"] == pytest.approx(2 / 3)
    assert q["boxes_per_image"] == pytest.approx(4 / 3)
    assert q["mean_best_iou"] == pytest.approx((1.0 + 1 / 9 + 10 / 11 + 0.0) / 4)


def test_quality_needs_overlapping_keys():
    with pytest.raises(ValueError, match="no predicted image"):
        localisation_quality({"x": (np.zeros((0, 4)), np.zeros(0))}, {"y": np.ones((1, 4))})


def test_baselines():
    sizes = {"a": (100, 50), "b": (40, 40)}
    truth = {"a": np.array([[0, 0, 50, 25]]), "b": np.array([[10, 10, 30, 30]])}
    whole = whole_image_baseline(sizes)
    np.testing.assert_array_equal(whole["a"][0], [[0, 0, 100, 50]])
    centre = centre_baseline(sizes, truth)
    np.testing.assert_allclose(centre["b"][0], [[10, 10, 30, 30]])  # median relative size 0.5
    np.testing.assert_allclose(centre["a"][0], [[25, 12.5, 75, 37.5]])
