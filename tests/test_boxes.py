import math
import subprocess
import sys

import cv2
import numpy as np
import pytest

from dap_ray.localisation.boxes import BoxConfig, cam_to_boxes, cam_to_boxes_batch
from dap_ray.localisation.boxes_reference import cam_to_boxes_reference

PRESETS = ["official", "paper"]


def unit_cells(cam):
    """Keyword arguments and image size under which one CAM cell is one pixel."""
    h, w = cam.shape
    return dict(scale=min(h, w), stride=1), (w, h)


def moment_box(cells, weights):
    """Eqs. (3)-(6) on explicit (row, col) cells and weights, cell i spanning [i, i+1)."""
    rows, cols = np.array(cells, float).T
    m = np.asarray(weights, float)
    cx, cy = (m * cols).sum() / m.sum(), (m * rows).sum() / m.sum()
    w = max(1.0, math.sqrt(12 * (m * (cols - cx) ** 2).sum() / m.sum()))
    h = max(1.0, math.sqrt(12 * (m * (rows - cy) ** 2).sum() / m.sum()))
    return [cx + 0.5 - w / 2, cy + 0.5 - h / 2, cx + 0.5 + w / 2, cy + 0.5 + h / 2]


def smooth_map(rng, h, w):
    coarse = rng.random((max(2, h // 3), max(2, w // 3))).astype(np.float32)
    fine = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return ((fine - fine.min()) / (fine.max() - fine.min() + 1e-9)).astype(np.float32)


# --- known answers -----------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(
    "cam",
    [np.zeros((18, 24), np.float32), np.full((18, 24), 0.2, np.float32), np.full((1, 1), 0.0, np.float32)],
    ids=["zeros", "at-lowest-threshold", "one-cell-zero"],
)
def test_nothing_above_lowest_threshold_gives_empty_arrays(preset, cam):
    boxes, scores = cam_to_boxes(cam, (500, 375), preset=preset)
    assert boxes.shape == (0, 4) and boxes.dtype == np.float32
    assert scores.shape == (0,) and scores.dtype == np.float32


@pytest.mark.parametrize("preset", PRESETS)
def test_constant_rectangle_gives_that_rectangle(preset):
    cam = np.zeros((20, 30), np.float32)
    cam[4:10, 5:15] = 1.0  # 6 rows, 10 columns
    kw, size = unit_cells(cam)
    boxes, scores = cam_to_boxes(cam, size, preset=preset, **kw)
    # All four thresholds give the same box; NMS keeps one. Uniform cells 0..n-1 have
    # variance (n^2 - 1) / 12, so each side is sqrt(n^2 - 1) (the formula's own
    # discretisation, as in the authors' script), centred on the rectangle.
    w, h = math.sqrt(10**2 - 1), math.sqrt(6**2 - 1)
    np.testing.assert_allclose(boxes, [[10 - w / 2, 7 - h / 2, 10 + w / 2, 7 + h / 2]], atol=1e-5)
    np.testing.assert_allclose(boxes, [[5, 4, 15, 10]], atol=0.05)
    np.testing.assert_array_equal(scores, [1.0])


@pytest.mark.parametrize("preset", PRESETS)
def test_single_cell_gives_exactly_that_cell(preset):
    cam = np.zeros((18, 24), np.float32)
    cam[3, 5] = 0.9
    boxes, _ = cam_to_boxes(cam, (500, 375), preset=preset)
    cell = 32 * 375 / 576  # one cell of the 576 grid, in original pixels
    np.testing.assert_allclose(boxes, [[5 * cell, 3 * cell, 6 * cell, 4 * cell]], rtol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_gaussian_blob_width_is_sqrt12_sigma(preset):
    sigma_x, sigma_y = 4.0, 2.5
    y, x = np.mgrid[0:64, 0:64].astype(np.float64)
    cam = np.exp(-((x - 30) ** 2) / (2 * sigma_x**2) - ((y - 33) ** 2) / (2 * sigma_y**2)).astype(np.float32)
    kw, size = unit_cells(cam)
    # Weights equal to the CAM over the whole (untruncated) blob.
    boxes, _ = cam_to_boxes(cam, size, preset=preset, thresholds=(0.0,), moment_bias=0.0, **kw)
    assert boxes.shape == (1, 4)
    x1, y1, x2, y2 = boxes[0]
    assert x2 - x1 == pytest.approx(math.sqrt(12) * sigma_x, rel=1e-4)
    assert y2 - y1 == pytest.approx(math.sqrt(12) * sigma_y, rel=1e-4)
    assert ((x1 + x2) / 2, (y1 + y2) / 2) == pytest.approx((30.5, 33.5), abs=1e-4)


@pytest.mark.parametrize("preset", PRESETS)
def test_two_separated_blobs_give_two_boxes(preset):
    cam = np.zeros((20, 40), np.float32)
    cam[3:9, 2:10] = 0.8
    cam[10:16, 25:33] = 0.8
    kw, size = unit_cells(cam)
    boxes, scores = cam_to_boxes(cam, size, preset=preset, **kw)
    assert boxes.shape == (2, 4)
    centres = sorted(((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes)
    assert centres == [pytest.approx((6, 6), abs=1e-5), pytest.approx((29, 13), abs=1e-5)]
    np.testing.assert_allclose(scores, [1, 1], rtol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(("small_shape", "kept"), [((4, 4), False), ((4, 5), True)])
def test_component_under_half_the_largest_is_dropped(preset, small_shape, kept):
    cam = np.zeros((20, 30), np.float32)
    cam[2:8, 2:8] = 1.0  # 36 cells; half is 18
    cam[12 : 12 + small_shape[0], 20 : 20 + small_shape[1]] = 1.0  # 16 or 20 cells
    kw, size = unit_cells(cam)
    boxes, scores = cam_to_boxes(cam, size, preset=preset, **kw)
    assert len(boxes) == (2 if kept else 1)
    assert scores[0] == 1.0 and boxes[0][0] < 10  # the large one first
    if kept:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert scores[1] == pytest.approx(area[1] / area[0], rel=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize(("nms_iou", "count"), [(0.8, 1), (0.999, 1), (1.0, 4)])
def test_nms_drops_duplicates_only_when_iou_exceeds_threshold(preset, nms_iou, count):
    cam = np.zeros((20, 30), np.float32)
    cam[4:10, 5:15] = 1.0  # the same box at all four thresholds: IoU exactly 1
    kw, size = unit_cells(cam)
    boxes, _ = cam_to_boxes(cam, size, preset=preset, nms_iou=nms_iou, **kw)
    assert len(boxes) == count


def test_nms_drops_a_near_duplicate_but_keeps_a_distinct_box():
    cam = np.zeros((30, 30), np.float32)
    cam[5:25, 5:25] = 0.35  # box at thresholds 0.2 and 0.3
    cam[6:25, 5:25] = 0.45  # nearly the same box at 0.4: IoU 0.95
    cam[10:18, 10:18] = 0.9  # a much smaller box at 0.5: IoU < 0.8
    kw, size = unit_cells(cam)
    boxes, scores = cam_to_boxes(cam, size, **kw)
    assert len(boxes) == 2
    assert scores[0] == 1.0 and scores[1] < 0.5


def test_rectangle_size_and_cell_count_rank_differently():
    cam = np.zeros((12, 20), np.float32)
    cam[2:4, 2:4] = 1.0  # compact: 4 cells, 2x2 rectangle
    for r, c in [(6, 10), (6, 11), (7, 11), (7, 12), (8, 12)]:  # staircase: 5 cells, 3x3 rectangle
        cam[r, c] = 1.0
    kw, size = unit_cells(cam)
    official, _ = cam_to_boxes(cam, size, preset="official", **kw)  # 4 < 9 / 2: dropped
    paper, _ = cam_to_boxes(cam, size, preset="paper", **kw)  # 4 >= 5 / 2: kept
    assert len(official) == 1 and len(paper) == 2
    assert len(cam_to_boxes(cam, size, preset="official", size_measure="cells", **kw)[0]) == 2


def test_official_moments_count_other_components_inside_the_rectangle():
    cam = np.zeros((10, 10), np.float32)
    l_shape = [(r, 3) for r in range(2, 7)] + [(6, c) for c in range(4, 8)]
    island = (3, 5)  # inside the L's 5x5 rectangle, not connected to it
    for cell in l_shape + [island]:
        cam[cell] = 0.6
    kw, size = unit_cells(cam)
    official, _ = cam_to_boxes(cam, size, preset="official", **kw)
    np.testing.assert_allclose(official, [moment_box(l_shape + [island], [0.82] * 10)], atol=1e-5)
    own, _ = cam_to_boxes(cam, size, preset="official", moment_region="component", **kw)
    np.testing.assert_allclose(own, [moment_box(l_shape, [0.82] * 9)], atol=1e-5)
    paper, _ = cam_to_boxes(cam, size, preset="paper", **kw)
    np.testing.assert_allclose(paper, [moment_box(l_shape, [0.6] * 9)], atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "expected_cols"), [("official", [16, 13, 10, 7]), ("paper", [1, 4, 7, 10, 13, 16])]
)
def test_official_caps_four_components_later_found_first(preset, expected_cols):
    cam = np.zeros((6, 20), np.float32)
    cam[2, [1, 4, 7, 10, 13, 16]] = 1.0  # six equal one-cell components
    kw, size = unit_cells(cam)
    boxes, scores = cam_to_boxes(cam, size, preset=preset, **kw)
    np.testing.assert_allclose(boxes, [[c, 2, c + 1, 3] for c in expected_cols])
    np.testing.assert_array_equal(scores, np.ones(len(expected_cols)))


def test_weights_use_cam_plus_bias_in_official():
    cam = np.zeros((10, 10), np.float32)
    cam[3, 2], cam[3, 3], cam[3, 4] = 0.9, 0.3, 0.3  # at threshold 0.2 only; weights differ
    kw, size = unit_cells(cam)
    cells = [(3, 2), (3, 3), (3, 4)]
    official, _ = cam_to_boxes(cam, size, preset="official", thresholds=(0.2,), **kw)
    paper, _ = cam_to_boxes(cam, size, preset="paper", thresholds=(0.2,), **kw)
    np.testing.assert_allclose(official, [moment_box(cells, [1.12, 0.52, 0.52])], atol=1e-5)
    np.testing.assert_allclose(paper, [moment_box(cells, [0.9, 0.3, 0.3])], atol=1e-5)


@pytest.mark.parametrize(("image_size", "expected_x2"), [((500, 375), 499.0), ((490, 375), 489.0)])
def test_boxes_are_clipped_to_the_image(image_size, expected_x2):
    cam = np.zeros((18, 24), np.float32)
    cam[5, 23] = 1.0  # last column; for 490 px wide it is partly stride padding
    boxes, _ = cam_to_boxes(cam, image_size)
    assert boxes[0, 2] == pytest.approx(expected_x2)
    assert boxes[0, 0] == pytest.approx(23 * 32 * 375 / 576, rel=1e-6)


def test_component_wholly_in_the_stride_padding_gives_no_box():
    # 737 px wide at scale 576 is 24 cells, the last one mostly padding: 23 * 32 > 737.
    image_size = (480, 375)  # resized to 737 x 576
    cam = np.zeros((18, 24), np.float32)
    cam[5, 23] = 1.0
    boxes, scores = cam_to_boxes(cam, image_size)
    assert boxes.shape == (0, 4) and scores.shape == (0,)
    cam[2, 2] = 0.7  # a real component of the same size, found first
    boxes, scores = cam_to_boxes(cam, image_size, preset="paper")
    cell = 32 * 375 / 576
    np.testing.assert_allclose(boxes, [[2 * cell, 2 * cell, 3 * cell, 3 * cell]], rtol=1e-6)
    np.testing.assert_array_equal(scores, [1.0])


# --- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cam", "image_size", "message"),
    [
        (np.zeros((0, 5), np.float32), (10, 10), "empty"),
        (np.array([[0.1, np.nan]], np.float32), (10, 10), "NaN or Inf"),
        (np.array([[0.1, np.inf]], np.float32), (10, 10), "NaN or Inf"),
        (np.zeros(5, np.float32), (10, 10), "2-D"),
        (np.zeros((2, 3, 4), np.float32), (10, 10), "2-D"),
        ("not a map", (10, 10), "2-D"),
        (np.zeros((4, 4), np.float32), (0, 10), "positive"),
        (np.zeros((4, 4), np.float32), (10, -3), "positive"),
        (np.zeros((4, 4), np.float32), (10,), "(W, H)"),
        (np.zeros((4, 4), np.float32), (float("nan"), 10), "positive"),
    ],
)
def test_bad_input_is_a_clear_value_error(cam, image_size, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cam_to_boxes(cam, image_size)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(preset="nope"), "unknown preset"),
        (dict(colour="red"), "unknown box option.*colour"),
        (dict(thresholds=()), "must not be empty"),
        (dict(thresholds=(0.2, 1.5)), r"\[0, 1\)"),
        (dict(nms_iou=1.5), "nms_iou"),
        (dict(max_components=0), "max_components"),
        (dict(size_measure="bbox"), "size_measure"),
        (dict(scale=0), "scale"),
    ],
)
def test_bad_options_are_clear_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cam_to_boxes(np.zeros((4, 4), np.float32), (10, 10), **kwargs)


def test_batch_names_the_bad_map():
    cams = [np.zeros((4, 4), np.float32), np.full((4, 4), np.nan, np.float32)]
    with pytest.raises(ValueError, match=r"cams\[1\]"):
        cam_to_boxes_batch(cams, [(10, 10), (10, 10)])
    with pytest.raises(ValueError, match="2 cams but 1 image sizes"):
        cam_to_boxes_batch(cams, [(10, 10)])


def test_config_sorts_thresholds_and_presets_differ():
    assert BoxConfig(thresholds=(0.5, 0.2)).thresholds == (0.2, 0.5)
    assert BoxConfig.from_preset("official") == BoxConfig()
    assert BoxConfig.from_preset("paper").max_components is None


# --- agreement -----------------------------------------------------------------------


def test_batch_of_nothing_is_empty():
    assert cam_to_boxes_batch([], []) == []


@pytest.mark.parametrize(("preset", "later_first"), [("official", True), ("paper", False)])
@pytest.mark.parametrize("wide", [True, False], ids=["landscape", "portrait"])
def test_equal_components_rank_in_raster_order_of_the_map_as_given(preset, later_first, wide):
    """Regression: wide maps are labelled transposed, where labelling order is column order."""
    cells = [(1, 3), (1, 8), (3, 2)]  # raster order; column order would be (3, 2) first
    cam = np.zeros((5, 12), np.float32)
    for r, c in cells:
        cam[r, c] = 1.0
    if not wide:
        cam, cells = cam.T.copy(), [(c, r) for r, c in cells]
        cells = sorted(cells)
    kw, size = unit_cells(cam)
    boxes, _ = cam_to_boxes(cam, size, preset=preset, **kw)
    expected = [[c, r, c + 1, r + 1] for r, c in (cells[::-1] if later_first else cells)]
    np.testing.assert_allclose(boxes, expected)


@pytest.mark.parametrize(
    "config",
    [
        BoxConfig.from_preset("official"),
        BoxConfig.from_preset("paper"),
        BoxConfig.from_preset("official", moment_region="component", ties_later_first=False),
        BoxConfig.from_preset("paper", size_measure="rectangle", max_components=2, nms_iou=0.5),
        BoxConfig(thresholds=(0.1, 0.25, 0.6, 0.75), moment_bias=0.5),
    ],
    ids=["official", "paper", "mixed-1", "mixed-2", "other-thresholds"],
)
def test_batched_equals_per_component_reference(rng, config):
    shapes = [tuple(rng.integers(1, 30, 2)) for _ in range(150)] + [(18, 24)] * 50
    shapes += [(18, int(n)) for n in rng.integers(40, 200, 10)] + [(int(n), 18) for n in rng.integers(40, 200, 10)]
    cams = [smooth_map(rng, h, w) for h, w in shapes]
    sizes = [tuple(int(v) for v in rng.integers(20, 900, 2)) for _ in cams]
    batched = cam_to_boxes_batch(cams, sizes, config)
    for cam, size, (boxes, scores) in zip(cams, sizes, batched):
        ref_boxes, ref_scores = cam_to_boxes_reference(cam, size, config)
        assert boxes.dtype == np.float32 and boxes.shape == ref_boxes.shape
        np.testing.assert_allclose(boxes, ref_boxes, atol=1e-3)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)


def test_batch_equals_one_at_a_time(rng):
    cams = [smooth_map(rng, h, w) for h, w in [(18, 24), (24, 18), (9, 12), (18, 24), (1, 7)]]
    sizes = [(500, 375), (375, 500), (400, 300), (640, 480), (70, 10)]
    for (b, s), cam, size in zip(cam_to_boxes_batch(cams, sizes), cams, sizes):
        b1, s1 = cam_to_boxes(cam, size)
        np.testing.assert_array_equal(b, b1)
        np.testing.assert_array_equal(s, s1)


@pytest.mark.parametrize(
    "shapes",
    [
        [],
        [(18, 24)] * 40,
        [(18, 24)] * 31 + [(18, 525)],  # one panorama among ImageNet-like maps
        "mixed",  # web-crawled: sides of 48 to 1,400 px at short side 576, stride 32
    ],
    ids=["empty", "uniform", "one-panorama", "mixed"],
)
def test_a_map_gets_the_same_boxes_in_any_batch(rng, shapes):
    """Regression: maps were padded to the batch's largest, so one panorama changed the work of
    every map. Each map's boxes are its own, whatever shares its batch (speed: bench_boxes.py)."""
    if shapes == "mixed":
        sides = rng.integers(48, 1401, (200, 2))
        shapes = [tuple(int(-(-576 * s // min(w, h) // 32)) for s in (h, w)) for w, h in sides]
    cams = [smooth_map(rng, h, w) for h, w in shapes]
    sizes = [(32 * w, 32 * h) for h, w in shapes]
    batched = cam_to_boxes_batch(cams, sizes)
    assert len(batched) == len(cams)
    for cam, size, (boxes, scores) in zip(cams, sizes, batched):
        alone_boxes, alone_scores = cam_to_boxes(cam, size)
        np.testing.assert_array_equal(boxes, alone_boxes)
        np.testing.assert_array_equal(scores, alone_scores)


def test_boxes_compile_where_numba_has_nowhere_to_cache(monkeypatch):
    """A read-only install with no writable home: numba refuses to decorate with cache=True;
    the boxes must then compile in each process instead of failing at import."""
    import numba.core.caching

    from dap_ray.localisation import boxes_loop

    monkeypatch.setattr(numba.core.caching.CacheImpl, "_locator_classes", [])
    with pytest.raises(RuntimeError, match="no locator"):
        numba.njit(cache=True)(lambda x: x)

    def add_one(x):
        return x + 1

    assert boxes_loop._compiled(add_one)(1) == 2


def test_inputs_of_any_layout_share_one_compiled_kernel(rng):
    """Numba compiles anew (seconds) for each array type, layout and writability it is given."""
    from dap_ray.localisation import boxes_loop

    cam = smooth_map(rng, 18, 24)
    read_only = np.array([[500.0, 375.0]])
    read_only.flags.writeable = False
    for cams, sizes in [
        ([cam], [(500, 375)]),
        ([cam.T], np.array([[375, 500]], np.int32)),
        ([np.asfortranarray(cam.astype(np.float64))], np.asfortranarray([[500.0, 375.0]])),
        ([cam[::2, ::3]], read_only),
    ]:
        cam_to_boxes_batch(cams, sizes)
    assert len(boxes_loop.boxes_loop.signatures) == 1


def test_importing_the_boxes_module_leaves_numba_for_the_first_boxes():
    """Ray workers that import the mining stages only to decode images skip numba's 0.4 s import."""
    script = ("import sys\nimport dap_ray.localisation.boxes, dap_ray.localisation.stages\n"
              "assert 'numba' not in sys.modules, 'numba imported'\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("frames", "expected_x_scale"),
    [([], None), ([(1.0, 1.0)], 1.0), ([(0.5, 1.0)], 2.0), ([(0.8, 1.0)], 1.25)],
)
def test_boxes_of_a_squeezed_map_are_stretched_back(frames, expected_x_scale):
    cam = np.zeros((6, 8), np.float32)
    cam[1:5, 2:6] = 1.0
    if not frames:
        assert cam_to_boxes_batch([], [], BoxConfig(scale=192), frames=frames) == []
        return
    fx = frames[0][0]
    (got, got_scores), = cam_to_boxes_batch([cam], [(256, 192)], BoxConfig(scale=192), frames=frames)
    (squeezed, scores), = cam_to_boxes_batch([cam], [(256 * fx, 192)], BoxConfig(scale=192))
    assert got.dtype == np.float32 and got.shape == squeezed.shape and len(got) >= 1
    np.testing.assert_allclose(got[:, [0, 2]], squeezed[:, [0, 2]] * expected_x_scale, rtol=1e-6)
    np.testing.assert_allclose(got[:, [1, 3]], squeezed[:, [1, 3]], rtol=1e-6)
    np.testing.assert_array_equal(got_scores, scores)


@pytest.mark.parametrize("frames", [[(0.0, 1.0)], [(1.5, 1.0)], [(np.nan, 1.0)], [(1.0, 1.0), (1.0, 1.0)]])
def test_bad_frames_are_a_clear_value_error(frames):
    with pytest.raises(ValueError, match=r"frames must be 1 \(fx, fy\) pairs in \(0, 1\]"):
        cam_to_boxes_batch([np.ones((2, 2), np.float32)], [(64, 64)], BoxConfig(scale=64), frames=frames)


def test_a_stretched_box_on_the_squeezed_images_edge_reaches_the_originals_edge():
    cam = np.zeros((6, 8), np.float32)
    cam[1:5, 4:] = 1.0  # a component up to the map's right edge
    (boxes, _), = cam_to_boxes_batch([cam], [(300, 192)], BoxConfig(scale=192), frames=[(0.8, 1.0)])
    assert boxes[0, 2] == 299.0 and boxes[0, 0] < 299.0
