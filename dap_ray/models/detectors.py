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

__all__ = ["CLASS_DEPENDENT_LAYERS", "DETECTORS", "InitReport", "build_detector", "detector_state_dict", "initialise",
           "load_pretrained_detector", "parse_init", "read_detector_run"]

DETECTORS = ("faster_rcnn_fpn", "retinanet_fpn")
# The layers whose shape depends on the number of classes: a new task starts them afresh. Named,
# not found by shape, since a task with as many classes as the pre-training would otherwise
# load a head that scores the wrong classes without a word. RetinaNet keeps its conv tower
# and box regression (class-agnostic); its fresh cls_logits keep the prior-probability bias.
CLASS_DEPENDENT_LAYERS = {
    "faster_rcnn_fpn": ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"),
    "retinanet_fpn": ("head.classification_head.cls_logits",),
}


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
    resize_in_training: bool = True,
    detections_per_image: int = 100,
    score_threshold: float = 0.05,
    nms_threshold: float = 0.5,
    test_proposals: int = 1000,
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
        resize_in_training: False when the data loader has already resized each image (our
            training loops do: one short side per batch, long side capped per image); the
            model then trains on the images as they come, where its own resize would take
            one size for the whole batch and shrink capped images again. Evaluation always
            resizes to ``min_size[-1]``.
        detections_per_image, score_threshold, nms_threshold: test-time output (100, 0.05
            and 0.5, maskrcnn-benchmark's and detectron2's defaults, which the paper used).
        test_proposals: Faster R-CNN's proposals per image at test time (1000 for FPN, as in
            maskrcnn-benchmark and detectron2); fewer make evaluation faster where images
            hold few objects.

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
                           box_batch_size_per_image=roi_batch_size_per_image, box_detections_per_img=detections_per_image,
                           box_score_thresh=score_threshold, box_nms_thresh=nms_threshold,
                           rpn_pre_nms_top_n_test=test_proposals, rpn_post_nms_top_n_test=test_proposals)
    else:
        model = RetinaNet(fpn, num_classes=num_classes + 1, min_size=min_size, max_size=max_size,
                          detections_per_img=detections_per_image, score_thresh=score_threshold,
                          nms_thresh=nms_threshold)
    # torchvision's own switch (used by its reference scripts' LSJ recipe): no resize in train mode.
    model.transform._skip_resize = not resize_in_training
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


def read_detector_run(run: str | Path) -> tuple[dict, Path]:
    """A Step 3 run's ``meta.json`` and its ``detector_final.pt``, from the run folder or the ``.pt``
    file (whose folder holds ``meta.json``). Raises ValueError naming what is missing."""
    import json

    run = Path(run)
    folder, weights = (run.parent, run) if run.suffix in (".pt", ".pth") else (run, run / "detector_final.pt")
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{meta_path} not found: give a pre-training run folder (or its detector_final.pt) "
                         "written by jobs/pretrain.py")
    if not weights.is_file():
        raise ValueError(f"{weights} not found: the pre-training run {folder} has not finished")
    meta = json.loads(meta_path.read_text())
    missing = [k for k in ("detector", "backbone", "num_classes") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks {missing}: not a torchvision pre-training run's meta.json")
    return meta, weights


def load_pretrained_detector(run: str | Path, *, map_location: str = "cpu") -> nn.Module:
    """The detector a Step 3 run trained, built as it was trained (frozen BatchNorm, the same
    frozen stages, sizes and proposals) with its weights loaded strictly, in eval mode.

    ``run``: the run folder (``meta.json`` and ``detector_final.pt``) or the ``.pt`` file.
    torchvision's own ``*_resnet50_fpn(weights=None)`` builders accept the same file but
    build plain BatchNorm with every layer trainable: a different model to fine-tune.
    """
    meta, weights = read_detector_run(run)
    config = meta.get("config", {})
    model = build_detector(meta["detector"], meta["backbone"], int(meta["num_classes"]) - 1,
                           trainable_layers=int(config.get("trainable_layers", 3)),
                           min_size=tuple(config.get("min_sizes", (640,))), max_size=int(config.get("max_size", 1333)),
                           roi_batch_size_per_image=int(config.get("roi_batch_size_per_image", 512)))
    state = torch.load(weights, map_location=map_location, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def parse_init(init: str) -> tuple[str, str | None]:
    """``"dap:RUN_OR_FILE"``, ``"cls:FILE_OR_TORCHVISION_NAME"`` or ``"scratch"`` to (kind, source)."""
    kind, _, source = init.partition(":")
    if kind == "scratch" and not source:
        return kind, None
    if kind in ("dap", "cls") and source:
        return kind, source
    raise ValueError(f"--init {init!r}: expected dap:RUN_DIR_OR_FILE (a Step 3 detector), cls:FILE_OR_TORCHVISION_NAME "
                     "(a classifier's trunk only) or scratch")


class InitReport(dict):
    """What an initialisation loaded: ``{"init", "source", "loaded", "fresh", "modules": {module:
    {"loaded": n, "fresh": n}}, "fresh_layers": [...]}``, counts in tensors."""

    def lines(self) -> list[str]:
        out = [f"init {self['init']} from {self['source']}: {self['loaded']} tensors loaded, {self['fresh']} fresh"]
        out += [f"  {name}: {v['loaded']} loaded, {v['fresh']} fresh" for name, v in sorted(self["modules"].items())]
        if self.get("fresh_layers"):
            out.append(f"  started afresh for the new classes: {', '.join(self['fresh_layers'])}")
        return out


def _module_of(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if parts[0] in ("backbone", "roi_heads", "head") else parts[0]


def initialise(model: nn.Module, init: str, *, detector: str, backbone: str) -> InitReport:
    """Load ``init``'s weights into ``model`` (a :func:`build_detector` of ``detector`` on ``backbone``,
    with the downstream task's classes) and say what was loaded.

    ``dap:RUN``: every tensor of the Step 3 detector except :data:`CLASS_DEPENDENT_LAYERS`,
    which start fresh; the missing keys must be exactly those and nothing may be unexpected.
    The run's detector and trunk must be ``detector`` and ``backbone``. ``cls:SOURCE``: the
    ResNet trunk of a classifier (a state dict file, or a torchvision name whose ImageNet
    weights torchvision provides, downloaded once into its cache); FPN, RPN and heads stay
    random, so that the two differ only in their initialisation. ``scratch``: nothing.
    Raises ValueError when an initialisation would load nothing or a checkpoint's
    architecture differs: never a silent random start.
    """
    kind, source = parse_init(init)
    state = model.state_dict()
    loaded: set[str] = set()
    fresh_layers: list[str] = []
    if kind == "dap":
        meta, weights = read_detector_run(source)
        if (meta["detector"], meta["backbone"]) != (detector, backbone):
            raise ValueError(f"--init {init}: that run pre-trained a {meta['detector']} on {meta['backbone']}, "
                             f"but this run builds a {detector} on {backbone}")
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
        fresh_layers = list(CLASS_DEPENDENT_LAYERS[detector])
        dropped = {k for k in checkpoint if any(k.startswith(layer + ".") for layer in fresh_layers)}
        kept = {k: v for k, v in checkpoint.items() if k not in dropped}
        expected_missing = {k for k in state if any(k.startswith(layer + ".") for layer in fresh_layers)}
        if not dropped:
            raise ValueError(f"--init {init}: {weights} has none of {fresh_layers}: not a {detector} checkpoint")
        try:
            result = model.load_state_dict(kept, strict=False)
        except RuntimeError as exc:  # shapes that differ: another architecture
            raise ValueError(f"--init {init}: {weights} does not fit a {detector} on {backbone}: "
                             f"{str(exc).splitlines()[-1].strip()}") from None
        missing, unexpected = set(result.missing_keys), set(result.unexpected_keys)
        if unexpected or missing != expected_missing:
            raise ValueError(f"--init {init}: {weights} is not this architecture: unexpected keys "
                             f"{sorted(unexpected)[:5]}, missing {sorted(missing - expected_missing)[:5]}")
        loaded = {k for k in kept if k in state}  # less the num_batches_tracked that FrozenBatchNorm drops
    elif kind == "cls":
        from dap_ray.models.classifiers import load_classifier

        if Path(source).is_file():
            trunk = load_classifier(backbone, source)
        else:
            trunk = _torchvision_classifier(source, backbone)
        body = {f"backbone.body.{k}": v for k, v in trunk.state_dict().items() if not k.startswith("fc.")}
        body = {k: v for k, v in body.items() if k in state}
        if not body:
            raise ValueError(f"--init {init}: no trunk tensor of {source} fits the {backbone} trunk")
        model.load_state_dict(body, strict=False)
        loaded = set(body)
    report = InitReport(init=kind, source=source or "random", loaded=len(loaded), fresh=len(state) - len(loaded),
                        modules={}, fresh_layers=fresh_layers)
    for key in state:
        counts = report["modules"].setdefault(_module_of(key), {"loaded": 0, "fresh": 0})
        counts["loaded" if key in loaded else "fresh"] += 1
    return report


def _torchvision_classifier(name: str, backbone: str) -> nn.Module:
    """torchvision's ImageNet classifier ``name`` (e.g. ``resnet50``) with its weights, which must be
    ``backbone``; torchvision downloads them once into its cache (``$TORCH_HOME``)."""
    import torchvision

    if name != backbone:
        raise ValueError(f"--init cls:{name}: not a file, and not this run's trunk {backbone!r} either")
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError):
        raise ValueError(f"--init cls:{name}: not a file, nor a torchvision classifier with ImageNet weights") from None
    try:
        return torchvision.models.get_model(name, weights=weights)
    except Exception as exc:  # no network, no cached file: urllib and hub raise many types
        raise ValueError(f"--init cls:{name}: torchvision could not provide its ImageNet weights ({exc}); "
                         "download them where there is a network, or give the state dict file") from None
