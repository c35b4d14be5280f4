"""The Ray edges: one module per DAP step that runs on Ray, each a thin layer over the plain library.

- :mod:`.classify`: Step 1, a classifier on image-level labels (Ray Train);
- :mod:`.mine`: Step 2, pseudo boxes from CAMs (Ray Data);
- :mod:`.pretrain`: Step 3, detector pre-training on the pseudo boxes (Ray Train; torchvision
  or detectron2 backend);
- :mod:`.ray_setup`: connecting to Ray and running a ``TorchTrainer``, shared by the steps;
- :mod:`.embedded`: the built-in sample carried through the steps, each step's default.

Only modules under here import Ray (``tests/test_layout.py`` checks it).
"""
