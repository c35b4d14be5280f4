"""A mini reproduction of the paper's claim on the built-in samples, in one command: Steps 1-3 on
the sample (cached), then Step 4 on the downstream sample from CLS and from DAP initialisation
at K = 5, 10, 20 images per class and all images, three seeds each, the same iterations for both.

    python jobs/reproduce.py                 # the default grid (under an hour on 2 CPU cores)
    python jobs/reproduce.py --quick         # K = 5 and all, one seed
    python jobs/reproduce.py --shots 5 10 --iterations 40 60 --seeds 0 1 2 3 4
    python jobs/reproduce.py --tuned --shots 5 10  # the tuned loop, five seeds (hours on 2 CPU cores)

--tuned: the box setting searched on held-out true boxes -> mining with it -> a pre-training
on those boxes -> a k-shot schedule searched per K and per initialisation (CLS and DAP each
get their own; where one search grew a range the other never tried, that one is searched again
over the ranges covering both and keeps its better schedule) -> the test split once per seed; OUTPUT/tuned/results.md puts its table beside
the preset grid's when OUTPUT/results.json holds one. jobs/gain_study.py builds on it.

Writes OUTPUT/results.json, results.md (AP and AP50, mean +- std, DAP minus CLS),
ap_vs_shots.png, learning_curves.png and each run under OUTPUT/<init>_<shots>/. Every stage is
cached or resumable: the same command again finds what is done.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import run_config_job  # noqa: E402
from dap_ray.steps.reproduce import ReproduceConfig, reproduce  # noqa: E402

if __name__ == "__main__":
    run_config_job(ReproduceConfig, reproduce, __doc__)
