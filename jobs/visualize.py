"""A contact sheet of mined images with their CAM heat maps and pseudo boxes (the paper's
Figure 6), for people who would rather look than read; with true boxes, where the boxes miss.

    python jobs/visualize.py --boxes dap_output/boxes --output grid.png [--num 16] [--input PATH] [--no-cam]
    python jobs/visualize.py --boxes dap_output/boxes --output worst.png \\
        --gt-boxes ~/.cache/dap_ray/sample-v1/data/gt_boxes.json --order worst
    python jobs/visualize.py --boxes dap_output/boxes --output some.png --order random --seed 3
    python jobs/visualize.py --boxes dap_output/boxes --output two.png --ids disc/disc_0001.jpg star/star_0002.jpg

Reads the mining run's config.yaml (beside boxes/) for the input, the classifier and scales;
--input overrides where the images are. The top-scored pseudo box is white, the others
yellow, each with its score; true boxes (--gt-boxes) green, and each tile's caption gives the
class, the box count and the image's best IoU against the truth. --order worst shows the
images whose boxes miss most first. Writes OUTPUT and the settings beside it (OUTPUT.yaml).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import run_config_job  # noqa: E402
from dap_ray.data.export import ContactSheetConfig, write_contact_sheet  # noqa: E402

if __name__ == "__main__":
    run_config_job(ContactSheetConfig, write_contact_sheet, __doc__)
