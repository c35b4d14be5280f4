"""Evaluation, plain numpy: pseudo-box quality against true boxes (:mod:`.localisation`) and
detector quality, COCO AP and PASCAL VOC AP50 (:mod:`.detection`).

Their names are re-exported here (``from dap_ray.evaluation import localisation_quality``).
"""

from dap_ray.evaluation.detection import (
                                          coco_metrics,
                                          detections_to_coco_results,
                                          evaluate_detections,
                                          voc_ap,
                                          voc_metrics,
)
from dap_ray.evaluation.localisation import (
                                             box_iou,
                                             centre_baseline,
                                             load_coco_boxes,
                                             localisation_quality,
                                             whole_image_baseline,
)

__all__ = [
    "box_iou",
    "centre_baseline",
    "coco_metrics",
    "detections_to_coco_results",
    "evaluate_detections",
    "load_coco_boxes",
    "localisation_quality",
    "voc_ap",
    "voc_metrics",
    "whole_image_baseline",
]
