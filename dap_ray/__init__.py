"""dap_ray: Detection-Aware Pre-training (DAP, CVPR 2021) on Ray.

The math lives in plain torch/numpy modules (:mod:`dap_ray.models`, :mod:`dap_ray.cam`,
:mod:`dap_ray.boxes`) that import no Ray; the pipeline, training and tuning modules sit on
top of them.
"""

__version__ = "0.1.0"
