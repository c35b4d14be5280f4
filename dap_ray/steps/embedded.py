"""The embedded default: the built-in sample set carried through every step, made on first use.

Run with no data arguments, each job works on the built-in sample (:mod:`dap_ray.data.sample`):
Step 1's classifier trained on it, Step 2's pseudo boxes mined with that classifier, Step 3
pre-training on those boxes. Each product is made the first time a step needs it and kept
in one cache (``~/.cache/dap_ray/sample-v1``, or ``$DAP_RAY_CACHE``), so every step's
default comes from here and no step's job calls another's. The steps themselves know
nothing of the sample: the jobs pass their configurations through the ``*_defaults``
functions below, which fill in only what the user left out.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from dap_ray.steps.mine import MineConfig
from dap_ray.steps.pretrain.config import PretrainConfig

__all__ = ["SAMPLE_MIN_SIZES", "SAMPLE_PRETRAIN", "SAMPLE_SCALES", "mine_defaults", "pretrain_defaults",
           "sample_cache", "sample_classifier", "sample_dataset", "sample_pseudo_boxes"]

# The sample's 128 px images and 96 px training crops stand to (96, 192) as ImageNet's
# ~400 px images and 224 px crops stand to the paper's (288, 576).
SAMPLE_SCALES = (96, 192)
# The sample's images are about a third of ImageNet's, as SAMPLE_SCALES are a third of (288, 576).
SAMPLE_MIN_SIZES = (32, 64, 96, 192)
# The sample's pre-training: minutes on 2 CPU cores. Applied to options still at the paper's default.
SAMPLE_PRETRAIN = dict(max_iters=100, warmup_iters=25, batch_size=4, num_workers=2, lr=0.01, checkpoint_every=25,
                       roi_batch_size_per_image=128, loader_workers=0, min_sizes=SAMPLE_MIN_SIZES, max_size=320)


def sample_cache(cache: str | Path | None = None) -> Path:
    """Where the embedded default keeps the sample set, its classifier, its pseudo boxes and detector."""
    return Path(cache or os.environ.get("DAP_RAY_CACHE", Path.home() / ".cache" / "dap_ray")) / "sample-v1"


def sample_dataset(cache: str | Path | None = None) -> Path:
    """The built-in sample set's folder (``images/``, ``classes.txt``, ``gt_boxes.json``), generated on first use."""
    from dap_ray.data.sample import SampleConfig, make_sample_dataset

    sample = sample_cache(cache) / "data"
    if not (sample / "gt_boxes.json").is_file():
        print(f"first run: generating the built-in sample set in {sample} (seconds)", flush=True)
        make_sample_dataset(sample, SampleConfig())
    return sample


def sample_classifier(cache: str | Path | None = None) -> Path:
    """Step 1 on the sample: the run folder of a resnet18 trained on it (``classifier.pt``, ``meta.json``)."""
    from dap_ray.steps.classify import ClassifierTrainConfig, train_classifier

    sample = sample_dataset(cache)
    run = sample_cache(cache) / "classifier"
    if not (run / "classifier.pt").is_file():
        print(f"first run: training a resnet18 on it, cached in {run} (about 4 minutes on 2 CPU cores)", flush=True)
        train_classifier(ClassifierTrainConfig(data=str(sample / "images"), class_map=str(sample / "classes.txt"),
                                               output=str(run)))
    return run


def sample_pseudo_boxes(cache: str | Path | None = None) -> Path:
    """Step 2 on the sample: the mining run's folder (``boxes/``, ``summary.json``), mined on first use."""
    from dap_ray.steps.mine import mine

    mined = sample_cache(cache) / "mined"
    if not (mined / "summary.json").is_file():
        print(f"first run: mining the built-in sample into {mined} (a few minutes the first time)", flush=True)
        mine(mine_defaults(MineConfig(output=str(mined)), cache))
    return mined


def mine_defaults(cfg: MineConfig, cache: str | Path | None = None) -> MineConfig:
    """``cfg`` as it is when it names an input; else pointed at the sample and its classifier."""
    if cfg.input is not None:
        return cfg
    sample, run = sample_dataset(cache), sample_classifier(cache)
    meta = json.loads((run / "meta.json").read_text())
    print(f"mining the built-in sample set ({sample}) with the {meta['arch']} in {run}", flush=True)
    return dataclasses.replace(cfg, input=str(sample / "images"), format="folder", classifier=meta["arch"],
                               num_classes=meta["num_classes"], weights=str(run / "classifier.pt"),
                               class_map=str(sample / "classes.txt"),
                               scales=SAMPLE_SCALES, gt_boxes=cfg.gt_boxes or str(sample / "gt_boxes.json"))


def pretrain_defaults(cfg: PretrainConfig, cache: str | Path | None = None) -> PretrainConfig:
    """``cfg`` as it is when it names boxes; else the sample's pseudo boxes and classifier.

    Options the user left at the paper's defaults become a small run that takes minutes
    on 2 CPU cores (:data:`SAMPLE_PRETRAIN`); options the user set are kept.
    """
    if cfg.boxes is not None:
        return cfg
    mined, run = sample_pseudo_boxes(cache), sample_classifier(cache)
    meta = json.loads((run / "meta.json").read_text())
    defaults = PretrainConfig()
    small = {k: v for k, v in SAMPLE_PRETRAIN.items() if getattr(cfg, k) == getattr(defaults, k)}
    if cfg.backbone == defaults.backbone and cfg.backbone_weights is None:
        small.update(backbone=meta["arch"], backbone_weights=str(run / "classifier.pt"))
    print(f"pre-training on the built-in sample's pseudo boxes ({mined / 'boxes'})", flush=True)
    return dataclasses.replace(cfg, boxes=str(mined / "boxes"), **small)
