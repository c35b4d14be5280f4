import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dap_ray.localisation.cam import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CamExtractor,
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
