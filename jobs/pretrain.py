"""Step 3: pre-train a detector on mined pseudo boxes with Ray Train (TorchTrainer, DDP).

    python jobs/pretrain.py --boxes MINE_DIR/boxes --backbone-weights classifier.pt --output RUN_DIR \\
        [--detector faster_rcnn_fpn|retinanet_fpn] [--backbone resnet50] [--num-workers W] [--use-gpu] \\
        [--batch-size B] [--max-iters N] [--min-sizes 96 160 320 640] [--checkpoint-every K]

With no --boxes: the built-in sample's pseudo boxes (mined on first use, as jobs/mine.py's
default does) and a small detector, a few minutes on 2 CPU cores. The images are read from
the input the mining run names (its config.yaml) unless --input is given. Writes
RUN_DIR/detector_final.pt (a torchvision state dict: meta.json says which model loads it),
RUN_DIR/meta.json and RUN_DIR/config.yaml. Checkpoints every K iterations; running the same
command again after an interruption resumes from the last one. Connects to a running Ray
cluster if there is one (RAY_ADDRESS, or under `ray job submit`), else starts a local one.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import run_config_job  # noqa: E402
from dap_ray.steps.embedded import pretrain_defaults  # noqa: E402
from dap_ray.steps.pretrain import PretrainConfig, pretrain  # noqa: E402

if __name__ == "__main__":
    run_config_job(PretrainConfig, pretrain, __doc__, defaults=pretrain_defaults)
