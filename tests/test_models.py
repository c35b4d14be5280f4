import pytest
import torch
import torch.nn.functional as F
from torchvision.models.resnet import Bottleneck, ResNet

from dap_ray.models.classifiers import (
    TORCHVISION_CLASSIFIERS,
    CamModel,
    ResNetCam,
    as_cam_model,
    load_classifier,
    output_count,
)
from tests.factories import TinyCamNet, tiny_resnet


def test_required_torchvision_names_are_accepted():
    required = {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d"}
    assert required <= set(TORCHVISION_CLASSIFIERS)


@pytest.mark.parametrize(("spec", "num_classes"), [("resnet18", None), ("resnet18", 12), ("resnext50_32x4d", 3)])
def test_torchvision_names_build_random_init_models(spec, num_classes):
    model = load_classifier(spec, num_classes=num_classes)
    assert model.fc.out_features == (num_classes or 1000)
    assert not model.training


def test_weights_round_trip_and_num_classes_come_from_the_state_dict(tmp_path):
    source = load_classifier("resnet18", num_classes=4)
    path = tmp_path / "classifier.pt"
    torch.save(source.state_dict(), path)
    loaded = load_classifier("resnet18", weights=path)
    assert loaded.fc.out_features == 4
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_checkpoint_dicts_and_ddp_prefixes_are_unwrapped(tmp_path):
    source = tiny_resnet(num_classes=3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    loaded = load_classifier("tests.factories:tiny_resnet", weights=path, num_classes=3)
    assert torch.equal(loaded.fc.weight, source.fc.weight)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("", ValueError, "unknown classifier"),
        ("resnet9000", ValueError, "unknown classifier 'resnet9000'"),
        ("no_such_pkg.mod:make", ValueError, "cannot import module 'no_such_pkg.mod'"),
        ("tests.factories:missing", ValueError, "no callable 'missing'"),
        ("tests.factories:NOT_CALLABLE", ValueError, "no callable 'NOT_CALLABLE'"),
        ("tests.factories:not_a_module", ValueError, "not an nn.Module"),
        ("tests.factories:", ValueError, "package.module:factory"),
    ],
)
def test_bad_specs_are_clear_errors(spec, error, message):
    with pytest.raises(error, match=message):
        load_classifier(spec)


@pytest.mark.parametrize(
    ("spec", "num_classes", "outputs"),
    [
        ("tests.factories:tiny_cam_net", None, 3),  # called as it is
        ("tests.factories:tiny_cam_net", 3, 3),  # asked for what it gives: fine without the argument
        ("tests.factories:fixed_tiny_resnet", 10, 10),
        ("tests.factories:tiny_resnet", 4, 4),  # takes num_classes: passed on
    ],
)
def test_factories_without_num_classes_are_called_as_they_are(spec, num_classes, outputs):
    model = load_classifier(spec, num_classes=num_classes)
    assert output_count(model) == outputs


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.factories:tiny_cam_net", "3 outputs but 5 classes.*takes no num_classes.*class map of 3"),
        ("tests.factories:fixed_tiny_resnet", "10 outputs but 5 classes.*takes no num_classes.*class map of 10"),
    ],
)
def test_a_fixed_output_count_that_differs_names_both_numbers(spec, message):
    with pytest.raises(ValueError, match=message):
        load_classifier(spec, num_classes=5)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_classifier("resnet18", weights=tmp_path / "nope.pt")


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(load_classifier("resnet18", num_classes=4).state_dict(), path)
    with pytest.raises(ValueError, match=r"wrong shape: fc.bias \(4,\) vs \(6,\)"):
        load_classifier("resnet18", weights=path, num_classes=6)
    with pytest.raises(ValueError, match="do not fit classifier 'resnet34'.*missing: layer1.2"):
        load_classifier("resnet34", weights=path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not a torch file", "cannot read"), (None, "cannot read"), ([1, 2], "state dict of tensors")],
    ids=["garbage", "pickled-module", "list"],
)
def test_files_that_are_not_state_dicts_are_named(tmp_path, content, message):
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is None:
        torch.save(tiny_resnet(), path)  # a whole pickled model: refused by weights_only
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        load_classifier("resnet18", weights=path)


def test_resnet_adapter_meets_the_contract_and_reproduces_the_logits():
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=6).eval()  # custom depth, Bottleneck blocks
    cam_model = as_cam_model(model)
    assert isinstance(cam_model, ResNetCam) and isinstance(cam_model, CamModel)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = cam_model.feature_map(x)
        assert features.shape == (2, 2048, 2, 3)  # stride 32
        logits = F.linear(features.mean((2, 3)), cam_model.class_weight, cam_model.class_bias)
        torch.testing.assert_close(logits, model(x))


def test_conforming_modules_pass_through_and_others_are_refused():
    net = TinyCamNet()
    assert as_cam_model(net) is net
    assert isinstance(as_cam_model(load_classifier("tests.factories:tiny_cam_net")), TinyCamNet)
    with pytest.raises(ValueError, match="cannot take CAMs from a Sequential"):
        as_cam_model(load_classifier("tests.factories:plain_sequential"))
    bad = tiny_resnet()
    bad.fc = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Linear(512, 7))
    with pytest.raises(ValueError, match="fc must be one nn.Linear"):
        as_cam_model(bad)
