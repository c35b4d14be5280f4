"""Evaluation, plain numpy: pseudo-box quality against true boxes (:mod:`.localisation`).

Its names are re-exported here (``from dap_ray.evaluation import localisation_quality``).
"""

from dap_ray.evaluation.localisation import (box_iou, centre_baseline, load_coco_boxes, localisation_quality,
                                             whole_image_baseline)

__all__ = ["box_iou", "centre_baseline", "load_coco_boxes", "localisation_quality", "whole_image_baseline"]
