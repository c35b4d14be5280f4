"""Search ranges (dap_ray.search): the edges a best value sits on, ranges grown past them to their
hard limits, and the threshold sets the box search draws. Plain Python, no Ray."""

import pytest

from dap_ray.search import (
    SearchRange,
    covering_ranges,
    describe_edge,
    describe_rounds,
    edges_hit,
    extend,
    threshold_set,
)

NMS = SearchRange("nms_iou", 0.5, 0.9, limit_low=0.3, limit_high=1.0)
LR = SearchRange("lr", 0.001, 0.04, limit_low=1e-5, limit_high=0.2, log=True)
COUNT = SearchRange("threshold_count", 1, 6, limit_low=1, limit_high=10, integer=True)


@pytest.mark.parametrize("ranges, best, expected", [
    ([], {}, []),
    ([NMS], {"nms_iou": 0.7}, []),
    ([NMS], {"nms_iou": 0.895}, [("nms_iou", "high", True)]),
    ([NMS], {"nms_iou": 0.51}, [("nms_iou", "low", True)]),
    ([LR], {"lr": 0.0063}, []),  # the middle on a log scale, far from the arithmetic middle
    ([LR], {"lr": 0.038}, [("lr", "high", True)]),
    ([COUNT], {"threshold_count": 1}, [("threshold_count", "low", False)]),  # 1 is the hard limit
    ([COUNT, NMS], {"threshold_count": 6, "nms_iou": 0.7}, [("threshold_count", "high", True)]),
    ([COUNT], {"threshold_count": 5}, []),
    # Regression: 145 of 20-160 on a log scale is 95% of the way up, on the edge (whole numbers too).
    ([SearchRange("max_iters", 20, 160, 1, 640, log=True, integer=True)], {"max_iters": 145},
     [("max_iters", "high", True)]),
])
def test_edges_hit(ranges, best, expected):
    assert [(h["name"], h["side"], h["growable"]) for h in edges_hit(ranges, best)] == expected


@pytest.mark.parametrize("best, rounds_left, action", [
    ({"threshold_count": 6}, 1, "grown for the next round"),
    ({"threshold_count": 6}, 0, "no rounds left to grow it (--extend-rounds)"),
    ({"threshold_count": 1}, 1, "at its hard limit, not grown"),
])
def test_what_a_search_does_about_an_edge(best, rounds_left, action):
    (hit,) = edges_hit([COUNT], best, rounds_left=rounds_left)
    assert hit["action"] == action and describe_edge(hit).endswith(f"edge of [1, 6]: {action}")


def test_ranges_grow_past_the_edge_hit_to_their_hard_limits():
    assert NMS.grown("high") == SearchRange("nms_iou", 0.5, 1.0, limit_low=0.3, limit_high=1.0)  # stopped at 1
    assert NMS.grown("low").low == pytest.approx(0.3)
    assert LR.grown("high").high == pytest.approx(0.2) and LR.grown("low").low == pytest.approx(0.001 / 40)
    assert COUNT.grown("high").high == 10 and COUNT.grown("low") == COUNT
    assert extend([NMS, LR], edges_hit([NMS, LR], {"nms_iou": 0.7, "lr": 0.04})) == [NMS, LR.grown("high")]
    one = SearchRange("x", 0.5, 0.5, limit_low=0, limit_high=1)
    assert one.edge(0.5) is None  # a range of one value has no edge to move past


@pytest.mark.parametrize("arguments, message", [
    (("x", 0.9, 0.5, 0.0, 1.0), "must lie within"),
    (("x", 0.5, 1.5, 0.0, 1.0), "must lie within"),
    (("x", 0.0, 0.5, 0.0, 1.0, True), "log scale"),
    (("x", 1.5, 3, 1, 10, False, True), "whole numbers"),
])
def test_bad_ranges_are_refused_by_name(arguments, message):
    with pytest.raises(ValueError, match=message):
        SearchRange(*arguments)


ITERS = SearchRange("max_iters", 20, 160, limit_low=1, limit_high=640, log=True, integer=True)


@pytest.mark.parametrize("searched, expected", [
    ([], {"max_iters": [20, 160], "lr": [0.001, 0.04]}),  # nothing searched: the starting ranges
    ([{"max_iters": [20, 160], "lr": [0.001, 0.04]}] * 2, {"max_iters": [20, 160], "lr": [0.001, 0.04]}),
    # The tuned loop at K = 10: CLS grew its iterations to 640, DAP did not; DAP is searched over CLS's.
    ([{"max_iters": [20, 640], "lr": [0.001, 0.04]}, {"max_iters": [20, 160], "lr": [0.001, 0.04]}],
     {"max_iters": [20, 640], "lr": [0.001, 0.04]}),
    # Each grew a different range: the covering ranges take both, and neither search had them.
    ([{"max_iters": [20, 640], "lr": [0.001, 0.04]}, {"max_iters": [20, 160], "lr": [2.5e-5, 0.04]}],
     {"max_iters": [20, 640], "lr": [2.5e-5, 0.04]}),
    # Held within the hard limits, whatever a search recorded.
    ([{"max_iters": [1, 2560], "lr": [0.001, 0.5]}], {"max_iters": [1, 640], "lr": [0.001, 0.2]}),
])
def test_covering_ranges(searched, expected):
    assert covering_ranges(searched, [ITERS, LR]) == expected


def test_covering_ranges_refuse_searches_over_other_parameters():
    with pytest.raises(ValueError, match=r"ranges over \['lr'\] cannot be matched"):
        covering_ranges([{"lr": [0.001, 0.04]}], [ITERS, LR])


@pytest.mark.parametrize("start, step, count, expected", [
    (0.2, 0.1, 4, (0.2, 0.3, 0.4, 0.5)),  # the paper's
    (0.3, 0.1, 1, (0.3,)),
    (0.8, 0.1, 4, (0.8, 0.9)),  # 1.0 and 1.1 dropped
    (0.123456, 0.05, 2, (0.123, 0.173)),
])
def test_threshold_set(start, step, count, expected):
    assert threshold_set(start, step, count) == pytest.approx(expected)


def test_sweep_configs_refuse_bad_ranges_by_name():
    from dap_ray.steps.tune import TuneBoxesConfig, TuneFinetuneConfig

    with pytest.raises(ValueError, match="nms_iou range"):
        TuneBoxesConfig(nms_iou_range=(0.9, 0.5))
    with pytest.raises(ValueError, match="threshold_start_range is two numbers"):
        TuneBoxesConfig(threshold_start_range=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="report_fraction"):
        TuneBoxesConfig(report_fraction=1.0)
    with pytest.raises(ValueError, match="lr range"):
        TuneFinetuneConfig(lr_range=(0.0, 0.1))


def test_rounds_read_as_markdown():
    assert describe_rounds([], "", "best", "AP50") == []
    hit = edges_hit([COUNT], {"threshold_count": 6}, rounds_left=1)
    lines = describe_rounds([{"round": 1, "trials": 4, "ranges": {"threshold_count": [1, 6]}, "best": 25.0,
                              "edges": hit},
                             {"round": 2, "trials": 2, "ranges": {"threshold_count": [1, 10]}, "best": 26.5,
                              "edges": []}], "K = 5, ", "best", "AP50")
    assert lines[1] == "K = 5, round 1: 4 trials over threshold_count [1, 6]; best AP50 so far 25.00."
    assert lines[2].endswith("edge of [1, 6]: grown for the next round.")
    assert lines[-1] == "- the best setting lies inside every range."
