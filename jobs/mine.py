"""Step 2: mine pseudo boxes from class activation maps with Ray Data.

    python jobs/mine.py                      # the built-in sample set, end to end, on a local Ray
    ray job submit --working-dir . -- python jobs/mine.py --input /data/imagenet/train \\
        --classifier resnet50 --weights resnet50.pth --num-gpus-per-actor 1 --actors 1 8

Writes OUTPUT/boxes/*.parquet (image_id, label, width, height, boxes as lists of
[x1, y1, x2, y2] in original pixels, scores), OUTPUT/errors/*.parquet (image_id, label,
error), OUTPUT/summary.json and OUTPUT/config.yaml. Running the same command again resumes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import run_config_job  # noqa: E402
from dap_ray.steps.embedded import mine_defaults  # noqa: E402
from dap_ray.steps.mine import MineConfig, mine  # noqa: E402

if __name__ == "__main__":
    run_config_job(MineConfig, mine, __doc__, defaults=mine_defaults)
