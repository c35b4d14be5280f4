"""Weights between torchvision's and detectron2's names, for the detectron2 backend and for Step 4
starting from either backend's pre-training. Plain torch/numpy: detectron2 is not needed.

Faster R-CNN FPN only (RetinaNet's heads and P6/P7 inputs differ between the two libraries).
The mapping was checked against detectron2's own model: the renamed weights give the same
FPN features, RPN outputs and box-head scores and deltas (``tests/test_detectron2.py``), with
detectron2's box pooler set to torchvision's (``ROIAlign``, not ``ROIAlignV2``; sampling 2).
"""

from __future__ import annotations

import re

import numpy as np
import torch

__all__ = ["detectron2_detector_to_torchvision", "detectron2_to_torchvision", "torchvision_detector_to_detectron2",
           "torchvision_to_detectron2"]


def torchvision_to_detectron2(state: dict) -> dict[str, np.ndarray]:
    """A torchvision ResNet state dict renamed to detectron2's ``backbone.bottom_up`` layout.

    Keys as detectron2 loads them with ``matching_heuristics`` (no ``backbone.bottom_up.``
    prefix; the heuristics add it), values as numpy arrays; ``fc`` is left out.
    """
    renamed = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        new = key
        if new.startswith(("conv1.", "bn1.")):
            new = "stem." + new
        new = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", new)
        new = re.sub(r"bn(\d)", r"conv\1.norm", new)
        new = new.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        renamed[new] = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    return renamed


def detectron2_to_torchvision(state: dict) -> dict:
    """The inverse of :func:`torchvision_to_detectron2`: detectron2's ResNet names (``stem``,
    ``res2``..``res5``, ``convK.norm``, ``shortcut``) back to torchvision's."""
    renamed = {}
    for key, value in state.items():
        new = re.sub(r"^stem\.conv1\.norm\.", "bn1.", key)
        new = re.sub(r"^stem\.conv1\.", "conv1.", new)
        new = re.sub(r"^res(\d)", lambda m: f"layer{int(m.group(1)) - 1}", new)
        new = new.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
        new = re.sub(r"conv(\d)\.norm", r"bn\1", new)
        renamed[new] = value
    return renamed


# Faster R-CNN FPN beyond the trunk: torchvision name -> detectron2 name.
_FRCNN_NAMES = {
    **{f"backbone.fpn.inner_blocks.{i}.0": f"backbone.fpn_lateral{i + 2}" for i in range(4)},
    **{f"backbone.fpn.layer_blocks.{i}.0": f"backbone.fpn_output{i + 2}" for i in range(4)},
    "rpn.head.conv.0.0": "proposal_generator.rpn_head.conv",
    "rpn.head.cls_logits": "proposal_generator.rpn_head.objectness_logits",
    "rpn.head.bbox_pred": "proposal_generator.rpn_head.anchor_deltas",
    "roi_heads.box_head.fc6": "roi_heads.box_head.fc1",
    "roi_heads.box_head.fc7": "roi_heads.box_head.fc2",
    "roi_heads.box_predictor.cls_score": "roi_heads.box_predictor.cls_score",
    "roi_heads.box_predictor.bbox_pred": "roi_heads.box_predictor.bbox_pred",
}


def torchvision_detector_to_detectron2(state: dict) -> dict:
    """A whole torchvision Faster R-CNN FPN state dict (:func:`dap_ray.models.detectors.build_detector`)
    in detectron2's ``GeneralizedRCNN`` names and layout, tensors as they are.

    The class layers change layout as well as names: torchvision's background is class 0 of
    ``cls_score`` and has its own 4 rows in ``bbox_pred``; detectron2's background is the last
    class and has no box rows.
    """
    trunk = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
    out = {f"backbone.bottom_up.{k}": torch.as_tensor(v) for k, v in torchvision_to_detectron2(trunk).items()}
    for key, value in state.items():
        if key.startswith("backbone.body.") or key.endswith("num_batches_tracked"):
            continue
        prefix, _, leaf = key.rpartition(".")
        if prefix not in _FRCNN_NAMES:
            raise ValueError(f"{key!r} is not a Faster R-CNN FPN weight this conversion knows (RetinaNet is not "
                             "converted)")
        if prefix == "roi_heads.box_predictor.cls_score":
            value = torch.cat([value[1:], value[:1]])  # background from first to last
        elif prefix == "roi_heads.box_predictor.bbox_pred":
            value = value[4:]  # no box rows for the background
        out[f"{_FRCNN_NAMES[prefix]}.{leaf}"] = value
    return out


def detectron2_detector_to_torchvision(state: dict) -> dict:
    """The inverse of :func:`torchvision_detector_to_detectron2`: a detectron2 Faster R-CNN FPN
    checkpoint (``detector_final_d2.pth``, or its ``"model"`` entry) in torchvision's names, so
    that Step 4 can start from either backend's pre-training."""
    state = state.get("model", state) if isinstance(state, dict) else state
    back = {v: k for k, v in _FRCNN_NAMES.items()}
    trunk = {k[len("backbone.bottom_up."):]: v for k, v in state.items() if k.startswith("backbone.bottom_up.")}
    out = {f"backbone.body.{k}": torch.as_tensor(v) for k, v in detectron2_to_torchvision(trunk).items()}
    for key, value in state.items():
        if key.startswith("backbone.bottom_up."):
            continue
        prefix, _, leaf = key.rpartition(".")
        if prefix not in back:
            continue  # anchors' buffers, pixel mean and std: not weights
        value = torch.as_tensor(value)
        if prefix == "roi_heads.box_predictor.cls_score":
            value = torch.cat([value[-1:], value[:-1]])
        elif prefix == "roi_heads.box_predictor.bbox_pred":
            value = torch.cat([torch.zeros_like(value[:4]), value])
        out[f"{back[prefix]}.{leaf}"] = value
    return out
