"""Classifier factories named as 'tests.factories:NAME' in load_classifier tests."""

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


def tiny_resnet(num_classes: int = 7) -> ResNet:
    """A torchvision ResNet with one block per stage: stride 32, fast on CPU."""
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


class TinyCamNet(nn.Module):
    """A non-ResNet that meets dap_ray.models.CamModel directly."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=32, padding=1), nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    @property
    def class_weight(self) -> torch.Tensor:
        return self.head.weight

    @property
    def class_bias(self) -> torch.Tensor:
        return self.head.bias


def tiny_cam_net() -> TinyCamNet:
    return TinyCamNet()


def plain_sequential() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())


def not_a_module():
    return "resnet"


NOT_CALLABLE = 3


class _Pause(nn.Module):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def forward(self, x):
        import time

        time.sleep(self.seconds)
        return x


def slow_tiny_resnet(num_classes: int = 7) -> ResNet:
    """tiny_resnet that pauses 0.1 s per forward pass: long enough runs to kill things in."""
    model = tiny_resnet(num_classes)
    model.layer1 = nn.Sequential(_Pause(0.1), model.layer1)
    return model


FAIL_ONCE_MARKER = __import__("pathlib").Path(__import__("tempfile").gettempdir()) / "dap_ray_tests_fail_once"


def fail_once_tiny_resnet(num_classes: int = 7) -> ResNet:
    """tiny_resnet whose first construction (anywhere on this machine) raises: a worker that dies once.

    Delete FAIL_ONCE_MARKER to arm it again.
    """
    if not FAIL_ONCE_MARKER.exists():
        FAIL_ONCE_MARKER.touch()
        raise RuntimeError("simulated worker failure")
    return tiny_resnet(num_classes)
