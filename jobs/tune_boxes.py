"""Ray Tune around Step 2: search the pseudo-box settings (thresholds, NMS IoU, preset, component
size rule) against true boxes, the CAMs computed once and cached.

    python jobs/tune_boxes.py                    # the built-in sample's true boxes and classifier
    python jobs/tune_boxes.py --gt-boxes imagenet_val_boxes.json --images /data/imagenet/val \\
        --classifier resnet50 --weights resnet50.pth --class-map LOC_synset_mapping.txt --limit 5000

The objective is AP50 of the scored pseudo boxes, per class, COCO-style (more boxes cannot
game it); CorLoc, any-hit, mean best IoU and boxes per image are reported beside it, and the
paper's defaults are always one of the trials. Writes OUTPUT/results.csv, results.parquet,
results.md (best first), best.yaml (for jobs/mine.py --config), sweep.png, summary.json and
config.yaml. The same command again resumes an interrupted sweep, keeping finished trials.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import run_config_job  # noqa: E402
from dap_ray.steps.embedded import tune_boxes_defaults  # noqa: E402
from dap_ray.steps.tune import TuneBoxesConfig, tune_boxes  # noqa: E402

if __name__ == "__main__":
    run_config_job(TuneBoxesConfig, tune_boxes, __doc__, defaults=tune_boxes_defaults)
