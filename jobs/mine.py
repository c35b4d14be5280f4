"""Step 2: mine pseudo boxes from class activation maps with Ray Data.

    python jobs/mine.py                      # the built-in sample set, end to end, on a local Ray
    ray job submit --working-dir . -- python jobs/mine.py --input /data/imagenet/train \\
        --classifier resnet50 --weights resnet50.pth --num-gpus-per-actor 1 --actors 1 8

Writes OUTPUT/boxes/*.parquet (image_id, label, width, height, boxes as lists of
[x1, y1, x2, y2] in original pixels, scores), OUTPUT/errors/*.parquet (image_id, label,
error), OUTPUT/summary.json and OUTPUT/config.yaml. Running the same command again resumes.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import add_config_arguments, resolve_config  # noqa: E402
from dap_ray.mining import MineConfig  # noqa: E402
from dap_ray.pipeline import mine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, MineConfig)
    args = parser.parse_args()
    try:
        config = resolve_config(MineConfig, args)
        mine(config)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
