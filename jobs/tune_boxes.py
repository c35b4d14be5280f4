"""Ray Tune around Step 2: search the pseudo-box settings (thresholds, NMS IoU, preset, component
size rule) against true boxes, the CAMs computed once and cached.

    python jobs/tune_boxes.py                    # the built-in sample's true boxes and classifier
    python jobs/tune_boxes.py --gt-boxes imagenet_val_boxes.json --images /data/imagenet/val \\
        --classifier resnet50 --weights resnet50.pth --class-map LOC_synset_mapping.txt --limit 5000
    python jobs/tune_boxes.py --search grid --threshold-sets 0.2,0.3,0.4,0.5 0.3,0.4,0.5,0.6 --nms-ious 0.7 0.8

By default Optuna's TPE searches the threshold set (start, step, count), the NMS IoU, the preset
and the size rule, the paper's setting first; when the best sits on a range's edge, another
round searches the range grown past it (or the output says why not). Half the labelled images
(--report-fraction) are held out: the search selects on the rest, and the best and the
paper's setting are scored on the held-out half once. The objective is AP50 of the scored
pseudo boxes, per class, COCO-style (more boxes cannot game it); CorLoc, any-hit, mean best
IoU and boxes per image are reported beside it. Writes OUTPUT/results.csv, results.parquet,
results.md (best first, the held-out figures, each round's ranges and edges), best.yaml (for
jobs/mine.py --config), sweep.png, summary.json and config.yaml. The same command again
resumes an interrupted sweep, keeping finished trials.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import run_config_job  # noqa: E402
from dap_ray.steps.embedded import tune_boxes_defaults  # noqa: E402
from dap_ray.steps.tune import TuneBoxesConfig, tune_boxes  # noqa: E402

if __name__ == "__main__":
    run_config_job(TuneBoxesConfig, tune_boxes, __doc__, defaults=tune_boxes_defaults)
