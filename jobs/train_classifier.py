"""Step 1: train a classifier on image-level labels with Ray Train (TorchTrainer, DDP).

    python jobs/train_classifier.py --data DIR/images --class-map DIR/classes.txt --output RUN_DIR \\
        [--arch resnet18] [--epochs E] [--batch-size B] [--lr LR] [--num-workers W] [--use-gpu]

Writes RUN_DIR/classifier.pt (a state dict for dap_ray.models.load_classifier),
RUN_DIR/meta.json and RUN_DIR/config.yaml. Checkpoints every epoch; running the same
command again after an interruption resumes from the last checkpoint. Connects to a running
Ray cluster if there is one (RAY_ADDRESS, or under `ray job submit`), else starts a local one.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import run_config_job  # noqa: E402
from dap_ray.steps.classify import ClassifierTrainConfig, train_classifier  # noqa: E402

if __name__ == "__main__":
    run_config_job(ClassifierTrainConfig, train_classifier, __doc__)
