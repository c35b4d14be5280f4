"""Detectors on a classifier's trunk (Steps 3 and 4), as plain torch: no Ray.

Detectors are torchvision's Faster R-CNN and RetinaNet with a ResNet-FPN backbone, built
exactly as ``fasterrcnn_resnet50_fpn`` / ``retinanet_resnet50_fpn`` build theirs (frozen
BatchNorm, the stem and ``layer1`` frozen, FPN on ``layer1..4`` or ``layer2..4`` plus P6/P7),
but with the trunk taken from a Step 1 classifier (:func:`dap_ray.models.load_classifier`)
and everything else at random. Class ids are shifted by one: label k is detector class
k + 1, 0 is background.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["DETECTORS", "build_detector", "detector_state_dict"]

DETECTORS = ("faster_rcnn_fpn", "retinanet_fpn")


def build_detector(
    detector: str,
    backbone: str,
    num_classes: int,
    *,
    backbone_weights: str | Path | None = None,
    trainable_layers: int = 3,
    min_size: tuple[int, ...] = (640,),
    max_size: int = 1333,
    roi_batch_size_per_image: int = 512,
) -> nn.Module:
    """A torchvision detector whose ResNet trunk comes from a Step 1 classifier.

    Args:
        detector: ``"faster_rcnn_fpn"`` or ``"retinanet_fpn"``.
        backbone: a torchvision ResNet name (``resnet50``...) or ``package.module:factory``
            returning a torchvision ``ResNet``, as :func:`dap_ray.models.load_classifier` takes.
        num_classes: object classes, without background (the model gets ``num_classes + 1``).
        backbone_weights: the classifier's state dict; None leaves the trunk at random.
        trainable_layers: ResNet stages trained, counted from ``layer4`` (3: the stem and
            ``layer1`` frozen, as in torchvision and detectron2's defaults).
        min_size, max_size: the model's own resize (test size: ``min_size[-1]``).
        roi_batch_size_per_image: Faster R-CNN's sampled proposals per image (512 as in
            the paper's detectron2 setting; fewer trains faster on CPU).

    Returns:
        The detector in train mode, on the CPU.
    """
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.resnet import ResNet
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    from dap_ray.models.classifiers import load_classifier

    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}: expected one of {DETECTORS}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must lie in [0, 5], got {trainable_layers}")
    trunk = load_classifier(backbone, backbone_weights)
    if not isinstance(trunk, ResNet):
        raise ValueError(f"backbone {backbone!r} is a {type(trunk).__name__}; detectors need a torchvision ResNet")
    _freeze_batch_norm(trunk)
    trained = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]  # frozen BatchNorm has no parameters
    for name, parameter in trunk.named_parameters():
        parameter.requires_grad_(any(name.startswith(layer) for layer in trained))
    stage2 = trunk.inplanes // 8  # torchvision's rule: layer4's channels / 8 are layer1's
    returned = [1, 2, 3, 4] if detector == "faster_rcnn_fpn" else [2, 3, 4]
    fpn = BackboneWithFPN(
        trunk,
        return_layers={f"layer{k}": str(i) for i, k in enumerate(returned)},
        in_channels_list=[stage2 * 2 ** (k - 1) for k in returned],
        out_channels=256,
        extra_blocks=LastLevelMaxPool() if detector == "faster_rcnn_fpn" else LastLevelP6P7(256, 256),
    )
    if detector == "faster_rcnn_fpn":
        model = FasterRCNN(fpn, num_classes=num_classes + 1, min_size=min_size, max_size=max_size,
                           box_batch_size_per_image=roi_batch_size_per_image)
    else:
        model = RetinaNet(fpn, num_classes=num_classes + 1, min_size=min_size, max_size=max_size)
    return model.train()


def _freeze_batch_norm(module: nn.Module) -> None:
    """BatchNorm2d to torchvision's FrozenBatchNorm2d in place, statistics kept."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batch_norm(child)


def detector_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain state dict that loads with ``strict=True`` into the matching torchvision model.

    Frozen BatchNorm has no ``num_batches_tracked``; it is added (as 0) for every frozen
    BatchNorm so that the torchvision builders without pre-trained weights (which use
    ``BatchNorm2d``, e.g. ``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None,
    num_classes=K + 1)``) accept the file strictly; ``FrozenBatchNorm2d`` ignores the key.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    from dap_ray.models.classifiers import unwrap_ddp

    model = unwrap_ddp(model)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            state[f"{name}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return state
