"""Classifiers for Step 1 and the contract that CAMs need from them.

A classifier can give CAMs when it ends in global average pooling and one linear layer:
the CAM of class k is then the 1x1 convolution of the last feature map with row k of the
linear weight, plus bias k (Zhou et al. 2016; Section 3.1 of the DAP paper).
:class:`CamModel` is that contract; :func:`as_cam_model` adapts models to it.

Adapting another architecture: write a factory that returns an ``nn.Module`` meeting
:class:`CamModel` and name it as ``"package.module:factory"``. For EfficientNet::

    # mypkg/cams.py
    import torch, torchvision

    class EfficientNetCam(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.efficientnet_b0()

        def feature_map(self, images):            # (N, 1280, H/32, W/32)
            return self.net.features(images)

        @property
        def class_weight(self):                   # (K, 1280)
            return self.net.classifier[1].weight

        @property
        def class_bias(self):                     # (K,)
            return self.net.classifier[1].bias

    def efficientnet_b0_cam():
        return EfficientNetCam()

``load_classifier("mypkg.cams:efficientnet_b0_cam", weights="cam.pt")`` then loads a state
dict with that module's keys (``net.features...``); a factory may also load weights itself
and be used with ``weights=None``. A factory may instead return any
``torchvision.models.ResNet`` (whatever its blocks), which is adapted automatically.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torchvision
from torch import Tensor, nn

__all__ = ["CamModel", "ResNetCam", "TORCHVISION_CLASSIFIERS", "as_cam_model", "load_classifier", "output_count",
           "unwrap_ddp"]

# torchvision builders accepted by name: ResNet-family models end in avgpool + fc.
TORCHVISION_CLASSIFIERS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnet152": torchvision.models.resnet152,
    "wide_resnet50_2": torchvision.models.wide_resnet50_2,
    "wide_resnet101_2": torchvision.models.wide_resnet101_2,
    "resnext50_32x4d": torchvision.models.resnext50_32x4d,
    "resnext101_32x8d": torchvision.models.resnext101_32x8d,
    "resnext101_64x4d": torchvision.models.resnext101_64x4d,
}


@runtime_checkable
class CamModel(Protocol):
    """What CAM extraction needs from a classifier (an ``nn.Module``).

    ``feature_map(images)``: float (N, 3, H, W) normalised images to the last feature map
    (N, C, h, w) before global average pooling (stride 32 for ResNets).
    ``class_weight``: the final linear layer's weight, (K, C).
    ``class_bias``: its bias, (K,).
    """

    def feature_map(self, images: Tensor) -> Tensor: ...

    @property
    def class_weight(self) -> Tensor: ...

    @property
    def class_bias(self) -> Tensor: ...


class ResNetCam(nn.Module):
    """:class:`CamModel` view of a ``torchvision.models.ResNet`` (shares its parameters)."""

    def __init__(self, resnet: torchvision.models.ResNet):
        super().__init__()
        if not isinstance(resnet.fc, nn.Linear):
            raise ValueError(
                f"the ResNet's fc must be one nn.Linear for CAMs, got {type(resnet.fc).__name__}"
            )
        self.resnet = resnet

    def feature_map(self, images: Tensor) -> Tensor:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(images))))
        return r.layer4(r.layer3(r.layer2(r.layer1(x))))

    @property
    def class_weight(self) -> Tensor:
        return self.resnet.fc.weight

    @property
    def class_bias(self) -> Tensor:
        fc = self.resnet.fc
        return fc.bias if fc.bias is not None else fc.weight.new_zeros(fc.out_features)


def as_cam_model(model: nn.Module) -> nn.Module:
    """``model`` as a :class:`CamModel`: ResNets are wrapped, conforming modules pass through."""
    if isinstance(model, torchvision.models.ResNet):
        return ResNetCam(model)
    if isinstance(model, nn.Module) and isinstance(model, CamModel):
        return model
    raise ValueError(
        f"cannot take CAMs from a {type(model).__name__}: give a torchvision ResNet or an "
        "nn.Module with feature_map(images), class_weight and class_bias "
        "(see dap_ray.models.CamModel)"
    )


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def load_classifier(
    spec: str, weights: str | Path | None = None, *, num_classes: int | None = None
) -> nn.Module:
    """Build a classifier and load its weights.

    Args:
        spec: a torchvision name (one of :data:`TORCHVISION_CLASSIFIERS`) or
            ``"package.module:factory"`` naming a callable that returns the model.
        weights: path to a state dict (read with ``weights_only=True``; a checkpoint dict
            holding it under ``"state_dict"`` or ``"model"``, and DDP's ``module.``
            prefixes, are accepted), or None to keep the random initialisation.
        num_classes: outputs of the final layer. Default: read from the state dict
            (its ``fc.weight``), else 1000 for torchvision names. Passed to a factory
            that takes a ``num_classes`` argument.

    Returns:
        The model in eval mode, on the CPU.

    Raises:
        ValueError: unknown name, a factory that cannot be imported or called, a file that
            is not a state dict, or a state dict that does not fit the model.
        FileNotFoundError: ``weights`` does not exist.
    """
    state = _read_state_dict(weights) if weights is not None else None
    fc_weight = (state or {}).get("fc.weight")
    if ":" in spec:
        model = _from_factory(spec, num_classes, int(fc_weight.shape[0]) if fc_weight is not None else None)
    elif spec in TORCHVISION_CLASSIFIERS:
        if num_classes is None:
            num_classes = int(fc_weight.shape[0]) if fc_weight is not None else 1000
        model = TORCHVISION_CLASSIFIERS[spec](weights=None, num_classes=num_classes)
    else:
        raise ValueError(
            f"unknown classifier {spec!r}: expected one of {sorted(TORCHVISION_CLASSIFIERS)} "
            "or 'package.module:factory'"
        )
    if state is not None:
        _load_into(model, state, spec, weights)
    return model.eval()


def _from_factory(spec: str, num_classes: int | None, from_weights: int | None = None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"classifier factory must look like 'package.module:factory', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} of classifier {spec!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"{module_name!r} has no callable {attr!r} (classifier {spec!r})")
    kwargs = {}
    takes_num_classes = "num_classes" in inspect.signature(factory).parameters
    if num_classes is None and takes_num_classes:
        num_classes = from_weights
    if num_classes is not None and takes_num_classes:
        kwargs["num_classes"] = num_classes
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"classifier factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    # Model zoos' ImageNet builders take no num_classes and return a fixed 1000-way model:
    # called as they are, then their output count is checked against the classes asked for.
    outputs = output_count(model)
    if num_classes is not None and outputs is not None and outputs != num_classes:
        raise ValueError(
            f"classifier factory {spec!r} returned a model with {outputs} outputs but {num_classes} classes "
            "are asked for (by num_classes, the class map or the weights); "
            + ("the factory takes num_classes but did not honour it" if takes_num_classes else
               f"it takes no num_classes argument: give a class map of {outputs} classes, or a factory that "
               "takes num_classes"))
    return model


def output_count(model: nn.Module) -> int | None:
    """Classes a classifier scores: rows of its CAM class weights (a ResNet's ``fc``, a
    :class:`CamModel`'s ``class_weight``), else a last ``fc`` Linear's outputs; None when unknown."""
    try:
        return int(as_cam_model(model).class_weight.shape[0])
    except (ValueError, AttributeError):
        fc = getattr(model, "fc", None)
        return int(fc.out_features) if isinstance(fc, nn.Linear) else None


def _read_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or pickled files
        raise ValueError(f"cannot read {path} as a state dict (weights_only=True): {exc}") from exc
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _load_into(model: nn.Module, state: dict[str, Tensor], spec: str, path: object) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise ValueError(f"weights {path} do not fit classifier {spec!r}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
