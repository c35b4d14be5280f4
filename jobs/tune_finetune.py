"""Ray Tune around Step 4: for each K, search the fine-tuning iterations and learning rate on a
validation split carved from the training images the k-shot draw left out (never the test
split), successive halving stopping weak trials early. By default Optuna's TPE searches both
on log scales (--iterations-range, --lr-range), a batch of trials at a time so that a rerun
searches the same, with another round over a range grown past an edge the best sits on;
--search grid tries every pair of --iterations and --lrs.

    python jobs/tune_finetune.py                 # the built-in downstream sample, from the sample's DAP run
    python jobs/tune_finetune.py --format voc --train VOCdevkit --train-splits 2007:trainval 2012:trainval \\
        --init dap:pretrain_run --shots 5 10 20 --iterations-range 500 4000 --lr-range 0.002 0.04 --samples 16 \\
        --workers-per-trial 4 --batch-size 4 --storage-path /shared/tune

Writes OUTPUT/kshot_preset.yaml (the chosen iterations and lr per K; give it to
jobs/finetune.py --kshot-table), results.csv, results.md, sweep.png and config.yaml. The same
command again resumes an interrupted sweep, keeping finished trials.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import run_config_job  # noqa: E402
from dap_ray.steps.embedded import tune_finetune_defaults  # noqa: E402
from dap_ray.steps.tune import TuneFinetuneConfig, tune_finetune  # noqa: E402

if __name__ == "__main__":
    run_config_job(TuneFinetuneConfig, tune_finetune, __doc__, defaults=tune_finetune_defaults)
