"""Step 4: fine-tune a detector on a downstream set with Ray Train (TorchTrainer, DDP), from DAP,
CLS or no pre-training, on all images or K per class, evaluated with COCO AP and VOC AP50.

    python jobs/finetune.py                      # the built-in downstream sample, from the sample's DAP run
    python jobs/finetune.py --format voc --train VOCdevkit --train-splits 2007:trainval 2012:trainval \\
        --test VOCdevkit --test-splits 2007:test --init dap:pretrain_run --shots 5 --seeds 0 1 2 \\
        --num-workers 8 --use-gpu --batch-size 2 --output voc_5shot_dap
    python jobs/finetune.py --train instances_train2017.json --train-images train2017 \\
        --test instances_val2017.json --test-images val2017 --init cls:resnet50_classifier.pt ...

--init dap:RUN_DIR loads a Step 3 detector but its class-dependent layers; cls:FILE (or a
torchvision name) loads a classifier's trunk only; scratch loads nothing. The schedule,
sizes and learning rate come from --preset voc|coco (the paper's), scaled to the total batch.
Writes RUN_DIR/detector_final.pt, metrics.json, metrics.jsonl, detections.json (COCO results),
learning_curve.png, init_report.json, kshot_images.json (k-shot), meta.json and config.yaml
(per seed under RUN_DIR/seed_S when several; then summary.json with mean and std). Checkpoints
every K iterations; the same command resumes after an interruption.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import run_config_job  # noqa: E402
from dap_ray.steps.embedded import finetune_defaults  # noqa: E402
from dap_ray.steps.finetune import FinetuneConfig, finetune  # noqa: E402

if __name__ == "__main__":
    run_config_job(FinetuneConfig, finetune, __doc__, defaults=finetune_defaults)
