"""Data, plain Python/numpy/torch: decoding images and class maps (:mod:`.images`), the three
input layouts cut into shards (:mod:`.sources`), the built-in sample set (:mod:`.sample`),
mined pseudo boxes as training data (:mod:`.pseudo_boxes`), detection batches
(:mod:`.detection`), and exports to COCO JSON and contact sheets (:mod:`.export`).

The image helpers are re-exported here (``from dap_ray.data import decode_image``).
"""

from dap_ray.data.images import (
                                 IMAGE_EXTENSIONS,
                                 MAX_IMAGE_PIXELS,
                                 BadImageError,
                                 FolderListing,
                                 decode_image,
                                 list_image_folder,
                                 read_class_map,
)

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "BadImageError", "FolderListing", "decode_image",
           "list_image_folder", "read_class_map"]
