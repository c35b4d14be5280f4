"""dap_ray: Detection-Aware Pre-training (DAP, CVPR 2021) on Ray.

The package reads as the method does. The plain library (torch, numpy, OpenCV; no Ray,
checked by ``tests/test_layout.py``):

- :mod:`dap_ray.localisation`: class activation maps and the boxes drawn from them (Step 2's math);
- :mod:`dap_ray.models`: classifiers (Step 1) and detectors on their trunks (Steps 3 and 4);
- :mod:`dap_ray.data`: images and where they come from, the built-in sample, pseudo boxes,
  detection batches, exports;
- :mod:`dap_ray.evaluation`: pseudo-box quality against true boxes;
- :mod:`dap_ray.config`: typed configurations as flags and YAML.

:mod:`dap_ray.steps` holds the Ray edges, one per DAP step that runs on Ray (``classify``:
Ray Train; ``mine``: Ray Data; ``pretrain``: Ray Train), the shared Ray plumbing and the
embedded default that carries the built-in sample through them. ``jobs/*.py`` are thin
scripts over the steps.
"""

__version__ = "0.1.0"
