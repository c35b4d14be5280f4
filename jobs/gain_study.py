"""What DAP pre-training buys on the built-in samples: DAP minus CLS at K = 5 and 10 against the
pre-training's length (100, 400, 1,600 iterations on the searched setting's boxes) and the
boxes' quality (the paper's setting, the searched one, the sample's true boxes), five seeds,
each paired with the tuned loop's CLS runs. Run the tuned loop into the same folder first:

    python jobs/reproduce.py --tuned --shots 5 10 --output reproduction
    python jobs/gain_study.py --output reproduction
    python jobs/gain_study.py --output reproduction --lengths 100 400 --boxes paper searched --seeds 0 1 2

Writes OUTPUT/study/results.json, results.md and gain.png. Pre-trainings and fine-tunes are
cached: the same command again finds what is done.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dap_ray.config import run_config_job  # noqa: E402
from dap_ray.steps.study import GainStudyConfig, gain_study  # noqa: E402

if __name__ == "__main__":
    run_config_job(GainStudyConfig, gain_study, __doc__)
