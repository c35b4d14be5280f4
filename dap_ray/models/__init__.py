"""Models, plain torch: classifiers and the CAM contract (:mod:`.classifiers`, Step 1), and
detectors on a classifier's trunk (:mod:`.detectors`, Steps 3 and 4).

The classifier names are re-exported here (``from dap_ray.models import load_classifier``).
"""

from dap_ray.models.classifiers import (
                                        TORCHVISION_CLASSIFIERS,
                                        CamModel,
                                        ResNetCam,
                                        as_cam_model,
                                        load_classifier,
                                        unwrap_ddp,
)

__all__ = ["TORCHVISION_CLASSIFIERS", "CamModel", "ResNetCam", "as_cam_model", "load_classifier", "unwrap_ddp"]
