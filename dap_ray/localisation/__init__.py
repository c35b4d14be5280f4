"""Step 2's math, plain torch/numpy/OpenCV/numba: class activation maps (:mod:`.cam`), boxes from
them (:mod:`.boxes`, with the per-component reference in :mod:`.boxes_reference`), and the
mining stages over pyarrow batches that Ray Data strings together (:mod:`.stages`).

Submodules are imported by name (``from dap_ray.localisation.boxes import cam_to_boxes``):
importing this package alone loads neither torch nor OpenCV.
"""
