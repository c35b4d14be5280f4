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


def fixed_tiny_resnet() -> ResNet:
    """Like a model zoo's ImageNet builder: no num_classes argument, a fixed output count (10)."""
    return tiny_resnet(num_classes=10)


def plain_sequential() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())


def not_a_module():
    return "resnet"


NOT_CALLABLE = 3


def _pause(seconds: float, module, inputs) -> None:
    import time

    time.sleep(seconds)


def _paused_tiny_resnet(num_classes: int, seconds: float) -> ResNet:
    """tiny_resnet that pauses ``seconds`` per forward pass. A hook pauses, so its state dict is
    tiny_resnet's (the same weights files load)."""
    import functools

    model = tiny_resnet(num_classes)
    model.layer1.register_forward_pre_hook(functools.partial(_pause, seconds))
    return model


def slow_tiny_resnet(num_classes: int = 7) -> ResNet:
    """tiny_resnet that pauses 0.1 s per forward pass: long enough runs to kill things in."""
    return _paused_tiny_resnet(num_classes, 0.1)


def slower_tiny_resnet(num_classes: int = 7) -> ResNet:
    """tiny_resnet that pauses 0.4 s per forward pass: a floor under a training iteration's time
    however fast the machine, so a run cannot finish inside a preemption notice of known length
    (an 8 s notice covers at most 20 iterations)."""
    return _paused_tiny_resnet(num_classes, 0.4)


FAIL_ONCE_MARKER = __import__("pathlib").Path(__import__("tempfile").gettempdir()) / "dap_ray_tests_fail_once"


def fail_once_tiny_resnet(num_classes: int = 7) -> ResNet:
    """tiny_resnet whose first construction (anywhere on this machine) raises: a worker that dies once.

    Delete FAIL_ONCE_MARKER to arm it again.
    """
    if not FAIL_ONCE_MARKER.exists():
        FAIL_ONCE_MARKER.touch()
        raise RuntimeError("simulated worker failure")
    return tiny_resnet(num_classes)


_TMP = __import__("pathlib").Path(__import__("tempfile").gettempdir())
FAIL_IN_EPOCH_TWO_MARKER = _TMP / "dap_ray_tests_fail_epoch_two"
FAIL_AT_STEP_THREE_MARKER = _TMP / "dap_ray_tests_fail_step_three"


class _FailOnceAfter(nn.Module):
    """Raises on the n-th training forward pass, once per machine (while ``marker`` does not exist)."""

    def __init__(self, calls: int, marker):
        super().__init__()
        self.calls, self.seen, self.marker = calls, 0, marker

    def forward(self, x):
        if self.training:
            self.seen += 1
            if self.seen == self.calls and not self.marker.exists():
                self.marker.touch()
                raise RuntimeError(f"simulated failure at training step {self.calls}")
        return x


def fail_in_epoch_two_tiny_resnet(num_classes: int = 7) -> ResNet:
    """tiny_resnet that dies once on its 6th training step (the tests' 33-image epochs are 5 steps of 8):
    after the epoch-1 checkpoint, before the end. Delete FAIL_IN_EPOCH_TWO_MARKER to arm it again."""
    model = tiny_resnet(num_classes)
    model.layer1 = nn.Sequential(_FailOnceAfter(6, FAIL_IN_EPOCH_TWO_MARKER), model.layer1)
    return model


def fail_at_step_three_tiny_resnet(num_classes: int = 7) -> ResNet:
    """tiny_resnet that dies once at its 3rd training step (a detector's iteration 3).
    Delete FAIL_AT_STEP_THREE_MARKER to arm it again."""
    model = tiny_resnet(num_classes)
    model.layer1 = nn.Sequential(_FailOnceAfter(3, FAIL_AT_STEP_THREE_MARKER), model.layer1)
    return model
