import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dap_ray.localisation.cam import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STATIC_BATCH_MULTIPLE,
    CamExtractor,
    forward_sizes,
    plan_shape,
    resize_short_side,
    resized_size,
)

SMALL_SCALES = (64, 128)  # the method's 288/576 cost seconds per image on CPU; the math is the same


def photo_like(rng, height, width):
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([(x * 0.7 + y * 0.3) % 256, np.sin(x / 9.0) * 90 + 128, np.cos(y / 7.0) * 90 + 128], -1)
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


def recipe_cam(model, image, label, scales, flip, stride=32):
    """The authors' recipe, step by step, one image at a time."""
    maps = []
    for scale in scales:
        x = torch.from_numpy(resize_short_side(image, scale)).permute(2, 0, 1).float() / 255
        x = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
        h, w = x.shape[1:]
        x = F.pad(x, (0, -w % stride, 0, -h % stride))[None]
        if flip:
            x = torch.cat([x, x.flip(-1)])
        trunk = torch.nn.Sequential(*list(model.children())[:-2])
        with torch.no_grad():
            features = trunk(x)
            if flip:
                features = (features[:1] + features[1:].flip(-1)) * 0.5
            cam = F.conv2d(features, model.fc.weight[label][None, :, None, None], model.fc.bias[label : label + 1])[0, 0]
        maps.append((cam - cam.min()) / (cam.max() - cam.min()))
    grid = maps[-1].shape
    return (sum(F.interpolate(m[None, None], size=grid, mode="nearest")[0, 0] for m in maps) / len(maps)).numpy()


@pytest.mark.parametrize(
    ("size", "short", "expected"),
    [((1, 1), 4, (4, 4)), ((500, 375), 288, (384, 288)), ((375, 500), 288, (288, 384)), ((431, 288), 576, (862, 576))],
)
def test_resized_size_keeps_aspect_with_torchvision_rounding(size, short, expected):
    assert resized_size(*size, short) == expected


@pytest.mark.parametrize("short", [1, 50, 288])
def test_resize_matches_pil_bilinear_within_one_level(rng, short):
    image = photo_like(rng, 120, 170)
    ours = resize_short_side(image, short)
    pil = np.asarray(Image.fromarray(image).resize((ours.shape[1], ours.shape[0]), Image.BILINEAR))
    assert np.abs(ours.astype(int) - pil.astype(int)).max() <= 1


def test_no_images_give_no_cams(tiny_model):
    assert CamExtractor(tiny_model, scales=SMALL_SCALES)([], []) == []


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("scales", [SMALL_SCALES, (96,), (40, 80, 120)])
def test_cams_follow_the_recipe(rng, tiny_model, flip, scales):
    images = [photo_like(rng, 75, 100), photo_like(rng, 100, 60)]
    labels = [3, 1]
    cams = CamExtractor(tiny_model, scales=scales, flip=flip, device="cpu")(images, labels)  # float32, as the recipe
    for image, label, cam in zip(images, labels, cams):
        expected = recipe_cam(tiny_model, image, label, sorted(scales), flip)
        assert cam.dtype == np.float32 and cam.shape == expected.shape
        np.testing.assert_allclose(cam, expected, atol=1e-5)


def test_cam_shape_is_the_largest_scales_stride_grid(rng, tiny_model):
    image = photo_like(rng, 37, 101)  # 128 short side: 128 x 349, padded to 128 x 352
    (cam,) = CamExtractor(tiny_model, scales=SMALL_SCALES)([image], [0])
    assert cam.shape == (4, 11)
    assert 0.0 <= cam.min() and cam.max() <= 1.0


def test_batched_and_one_at_a_time_agree(rng, tiny_model):
    shapes = [(75, 100), (100, 75), (75, 100), (60, 60), (75, 98), (10, 200), (75, 100)]
    images = [photo_like(rng, h, w) for h, w in shapes]
    labels = [i % 5 for i in range(len(images))]
    extractor = CamExtractor(tiny_model, scales=SMALL_SCALES, batch_size=2)
    batched = extractor(images, labels)
    alone = [extractor([image], [label])[0] for image, label in zip(images, labels)]
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_constant_cam_becomes_zeros_not_nan(rng, tiny_model):
    with torch.no_grad():
        tiny_model.fc.weight.zero_()
    (cam,) = CamExtractor(tiny_model, scales=SMALL_SCALES)([photo_like(rng, 50, 50)], [2])
    assert np.isfinite(cam).all() and (cam == 0).all()


@pytest.mark.parametrize(
    ("image", "label", "message"),
    [
        (np.zeros((20, 20), np.uint8), 0, r"images\[0\] must be an \(H, W, 3\) uint8"),
        (np.zeros((20, 20, 4), np.uint8), 0, r"images\[0\] must be .*shape \(20, 20, 4\)"),
        (np.zeros((20, 20, 3), np.uint16), 0, "uint16"),
        (np.zeros((0, 20, 3), np.uint8), 0, "empty"),
        ("image.jpg", 0, "got str"),
        (np.zeros((20, 20, 3), np.uint8), 5, r"labels\[0\] = 5 is outside the classifier's 5 classes"),
        (np.zeros((20, 20, 3), np.uint8), -1, "outside"),
        (np.zeros((20, 20, 3), np.uint8), 1.5, "must be an integer"),
    ],
)
def test_bad_input_is_a_clear_value_error(tiny_model, image, label, message):
    with pytest.raises(ValueError, match=message):
        CamExtractor(tiny_model, scales=SMALL_SCALES)([image], [label])


def test_the_callers_model_stays_where_it_was(tiny_model):
    before = {name: (p.device, p.is_contiguous()) for name, p in tiny_model.named_parameters()}
    tiny_model.train()
    extractor = CamExtractor(tiny_model, scales=SMALL_SCALES, device="cpu")
    assert {name: (p.device, p.is_contiguous()) for name, p in tiny_model.named_parameters()} == before
    assert tiny_model.training and not extractor.model.training


def test_label_count_must_match(rng, tiny_model):
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        CamExtractor(tiny_model, scales=SMALL_SCALES)([photo_like(rng, 20, 20)] * 2, [0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_cams_stay_close_to_cpu_float32(rng, tiny_model):
    images = [photo_like(rng, 75, 100), photo_like(rng, 100, 60)]
    cpu = CamExtractor(tiny_model, scales=SMALL_SCALES, device="cpu")(images, [0, 1])
    gpu = CamExtractor(tiny_model, scales=SMALL_SCALES, device="cuda")(images, [0, 1])
    for c, g in zip(cpu, gpu):
        assert np.abs(c - g).mean() < 0.02


# (h, w) at one scale -> (padded input shape, size the image takes in it), stride 32.
@pytest.mark.parametrize(
    ("policy", "aspects", "size", "expected"),
    [
        ("exact", (4 / 3,), (1, 1), ((32, 32), (1, 1))),
        ("exact", (4 / 3,), (288, 432), ((288, 448), (288, 432))),
        ("buckets", (4 / 3,), (1, 1), ((32, 64), (1, 1))),
        ("buckets", (4 / 3,), (288, 384), ((288, 384), (288, 384))),  # 4:3: its own shape
        ("buckets", (4 / 3,), (384, 288), ((384, 288), (384, 288))),  # 3:4
        ("buckets", (4 / 3,), (288, 288), ((288, 384), (288, 288))),  # square: padded, counted as landscape
        ("buckets", (4 / 3,), (288, 432), ((288, 384), (288, 384))),  # 3:2: squeezed
        ("buckets", (4 / 3,), (432, 288), ((384, 288), (384, 288))),  # 2:3
        ("buckets", (4 / 3, 2.0), (288, 432), ((288, 576), (288, 432))),  # fits the 2:1 bucket: padded
        ("buckets", (4 / 3, 2.0), (288, 700), ((288, 576), (288, 576))),
        ("buckets", (4 / 3,), (100, 150), ((128, 192), (100, 150))),  # short side padded first
    ],
)
def test_plan_shape(policy, aspects, size, expected):
    assert plan_shape(*size, policy=policy, bucket_aspects=aspects) == expected


def test_forward_sizes_count_the_passes():
    assert forward_sizes([], 256, policy="buckets") == []
    landscape, portrait = (288, 384), (384, 288)
    assert forward_sizes([landscape] * 300, 256) == [256, 44]
    mix = [landscape] * 150 + [(288, 288)] * 20 + [(288, 432)] * 30 + [portrait] * 40 + [(432, 288)] * 16
    assert sorted(forward_sizes(mix, 256, policy="buckets")) == [56, 200]
    assert len(forward_sizes(mix, 256, policy="exact")) == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(shapes="padded"), "shapes must be one of"),
        (dict(shapes="buckets", bucket_aspects=()), "bucket_aspects"),
        (dict(shapes="buckets", bucket_aspects=(0.75,)), "at least 1"),
        (dict(compile="fast"), "compile must be one of"),
    ],
)
def test_bad_shape_and_compile_options_are_clear_value_errors(tiny_model, options, message):
    with pytest.raises(ValueError, match=message):
        CamExtractor(tiny_model, scales=SMALL_SCALES, **options)


def test_buckets_keep_the_exact_shapes_and_values_where_nothing_is_padded_or_squeezed(rng, tiny_model):
    # At 64 and 128 px short sides, 4:3 and 3:4 images fill their bucket exactly; squares are
    # padded, 3:2 squeezed: their maps still have the exact path's shapes.
    shapes = [(75, 100), (100, 75), (60, 60), (50, 75), (75, 50)]
    images = [photo_like(rng, h, w) for h, w in shapes]
    labels = [i % 5 for i in range(len(images))]
    exact = CamExtractor(tiny_model, scales=SMALL_SCALES, device="cpu")(images, labels)
    buckets = CamExtractor(tiny_model, scales=SMALL_SCALES, device="cpu", shapes="buckets")(images, labels)
    for e, b in zip(exact, buckets):
        assert b.shape == e.shape and b.dtype == np.float32
        assert 0.0 <= b.min() and b.max() <= 1.0
    for k in (0, 1):
        np.testing.assert_allclose(buckets[k], exact[k], atol=1e-5)


def test_buckets_leave_padding_out_of_the_min_max_and_batching(rng, tiny_model):
    images = [photo_like(rng, 60, 60), photo_like(rng, 75, 100), photo_like(rng, 60, 60)]
    labels = [0, 1, 2]
    extractor = CamExtractor(tiny_model, scales=(64,), device="cpu", shapes="buckets", batch_size=2)
    batched = extractor(images, labels)
    alone = [extractor([image], [label])[0] for image, label in zip(images, labels)]
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(b, a, atol=1e-5)
    square = batched[0]  # 64 x 64 in a 64 x 96 input: its own 2 x 2 cells, spanning 0 to 1
    assert square.shape == (2, 2) and square.min() == 0.0 and square.max() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("mode", "device", "note"),
    [
        ("reduce-overhead", "cpu", "CUDA graphs) needs CUDA"),
        ("tensorrt", "cpu", "compile=tensorrt needs"),
    ],
)
def test_compile_modes_that_cannot_run_here_fall_back_to_eager_saying_why(rng, tiny_model, mode, device, note):
    images = [photo_like(rng, 75, 100)]
    extractor = CamExtractor(tiny_model, scales=SMALL_SCALES, device=device, shapes="buckets", compile=mode)
    assert extractor.compile_mode == "off" and note in extractor.compile_note
    eager = CamExtractor(tiny_model, scales=SMALL_SCALES, device=device, shapes="buckets")
    np.testing.assert_allclose(extractor(images, [1])[0], eager(images, [1])[0], atol=1e-6)


def test_a_compiler_failure_falls_back_to_eager_once(rng, tiny_model, monkeypatch):
    failure = type("BackendCompilerFailed", (RuntimeError,), {"__module__": "torch._dynamo.exc"})
    calls = []

    def failing(batch):
        calls.append(batch.shape)
        raise failure("backend='inductor' raised: no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: failing)
    images = [photo_like(rng, 75, 100), photo_like(rng, 60, 60)]
    extractor = CamExtractor(tiny_model, scales=SMALL_SCALES, device="cpu", shapes="buckets", compile=True)
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        cams = extractor(images, [1, 2])
    assert len(calls) == 1 and extractor.compile_mode == "off"
    assert "compile=default failed (BackendCompilerFailed: backend='inductor'" in extractor.compile_note
    eager = CamExtractor(tiny_model, scales=SMALL_SCALES, device="cpu", shapes="buckets")(images, [1, 2])
    for c, e in zip(cams, eager):
        np.testing.assert_allclose(c, e, atol=1e-6)


def test_other_errors_inside_a_compiled_network_are_not_swallowed(rng, tiny_model, monkeypatch):
    def failing(batch):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: failing)
    extractor = CamExtractor(tiny_model, scales=SMALL_SCALES, device="cpu", compile=True)
    with pytest.raises(RuntimeError, match="out of memory"):
        extractor([photo_like(rng, 75, 100)], [1])


def test_compiled_batches_are_padded_to_few_sizes(rng, tiny_model, monkeypatch):
    seen = []

    def recording(function, **kwargs):
        def run(batch):
            seen.append(batch.shape[0])
            return function(batch)
        return run

    monkeypatch.setattr(torch, "compile", recording)
    images = [photo_like(rng, 75, 100) for _ in range(3)]
    cams = CamExtractor(tiny_model, scales=(64,), device="cpu", shapes="buckets", compile=True)(images, [0, 1, 2])
    assert seen == [2 * STATIC_BATCH_MULTIPLE]  # 3 images and their mirrors, padded to 32 each
    eager = CamExtractor(tiny_model, scales=(64,), device="cpu", shapes="buckets")(images, [0, 1, 2])
    for c, e in zip(cams, eager):
        np.testing.assert_allclose(c, e, atol=1e-5)


def test_a_squeezed_images_map_comes_on_its_own_grid_with_its_frame(rng, tiny_model):
    image = torch.from_numpy(photo_like(rng, 64, 108)).permute(2, 0, 1)  # 64 x 108 at 64: squeezed to 64 x 96
    extractor = CamExtractor(tiny_model, scales=(64,), device="cpu", shapes="buckets")
    (native,), frames = extractor.from_tensors_native([[image]], [1])
    assert native.shape == (2, 3) and frames.tolist() == [[96 / 108, 1.0]]
    (on_exact_grid,) = extractor.from_tensors([[image]], [1])
    assert on_exact_grid.shape == (2, 4)  # 108 px: 4 cells of 32, as the exact path's map
    (exact,) = CamExtractor(tiny_model, scales=(64,), device="cpu").from_tensors([[image]], [1])
    assert exact.shape == on_exact_grid.shape
    empty, no_frames = extractor.from_tensors_native([], [])
    assert empty == [] and no_frames.shape == (0, 2)
