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
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the step modules import torch: the mining job's driver never needs it
    from dap_ray.steps.finetune import FinetuneConfig
    from dap_ray.steps.mine import MineConfig
    from dap_ray.steps.pretrain.config import PretrainConfig
    from dap_ray.steps.tune import TuneBoxesConfig, TuneFinetuneConfig

__all__ = ["SAMPLE_FINETUNE", "SAMPLE_MIN_SIZES", "SAMPLE_PRETRAIN", "SAMPLE_SCALES", "finetune_defaults",
           "mine_defaults", "pretrain_defaults", "tune_boxes_defaults", "tune_finetune_defaults", "sample_cache", "sample_classifier", "sample_dataset",
           "sample_downstream", "sample_pretrain_settings", "sample_true_boxes", "sample_pretrained_detector", "sample_pseudo_boxes"]

# The sample's 128 px images and 96 px training crops stand to (96, 192) as ImageNet's
# ~400 px images and 224 px crops stand to the paper's (288, 576).
SAMPLE_SCALES = (96, 192)
# The sample's images are about a third of ImageNet's, as SAMPLE_SCALES are a third of (288, 576).
SAMPLE_MIN_SIZES = (32, 64, 96, 192)
# The sample's pre-training: minutes on 2 CPU cores. Applied to options still at the paper's default.
SAMPLE_PRETRAIN = dict(max_iters=100, warmup_iters=25, batch_size=4, num_workers=2, lr=0.01, checkpoint_every=25,
                       roi_batch_size_per_image=128, loader_workers=0, min_sizes=SAMPLE_MIN_SIZES, max_size=320)


# The downstream sample's fine-tuning: its images are 128-160 px, as VOC's ~500 px stand to 640;
# they hold at most 4 objects, so 300 test proposals do (evaluation is then 3x faster on CPU).
# 150 iterations of 4 images (2 epochs) take about 4 minutes on 2 CPU cores.
SAMPLE_FINETUNE = dict(min_sizes=(160,), max_size=320, batch_size=4, loader_workers=0, max_iters=150,
                       checkpoint_every=50, roi_batch_size_per_image=128, test_proposals=300)


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
    from dap_ray.steps.mine import MineConfig, mine

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
    mined = sample_pseudo_boxes(cache)
    print(f"pre-training on the built-in sample's pseudo boxes ({mined / 'boxes'})", flush=True)
    return sample_pretrain_settings(dataclasses.replace(cfg, boxes=str(mined / "boxes")), cache)


def sample_pretrain_settings(cfg: PretrainConfig, cache: str | Path | None = None) -> PretrainConfig:
    """``cfg`` (boxes mined from the sample, by any box setting) as a small run on the sample: the
    options left at the paper's defaults become :data:`SAMPLE_PRETRAIN`'s, the backbone the
    sample classifier's trunk unless set."""
    from dap_ray.steps.pretrain.config import PretrainConfig

    run = sample_classifier(cache)
    meta = json.loads((run / "meta.json").read_text())
    defaults = PretrainConfig()
    small = {k: v for k, v in SAMPLE_PRETRAIN.items() if getattr(cfg, k) == getattr(defaults, k)}
    if cfg.backbone == defaults.backbone and cfg.backbone_weights is None:
        small.update(backbone=meta["arch"], backbone_weights=str(run / "classifier.pt"))
    return dataclasses.replace(cfg, **small)


def sample_pretrained_detector(cache: str | Path | None = None, **overrides) -> Path:
    """Step 3 on the sample: the run folder of a detector pre-trained on its pseudo boxes, trained on
    first use (``jobs/pretrain.py``'s embedded default; ``overrides`` change it, into its own folder)."""
    from dap_ray.steps.pretrain import PretrainConfig, pretrain

    name = "pretrained" + "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    run = sample_cache(cache) / name
    if not (run / "meta.json").is_file():
        print(f"first run: pre-training a detector on the sample's pseudo boxes into {run} (minutes)", flush=True)
        pretrain(pretrain_defaults(PretrainConfig(output=str(run), **overrides), cache))
    return run


def sample_true_boxes(cache: str | Path | None = None) -> Path:
    """The sample's true boxes laid out as a mining run's ``boxes/`` folder (every box scored 1), for
    a pre-training on them: the ceiling pseudo boxes can reach. Written on first use."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from dap_ray.evaluation.localisation import load_coco_boxes
    from dap_ray.localisation.stages import BOXES_SCHEMA

    sample = sample_dataset(cache)
    boxes = sample_cache(cache) / "true_boxes" / "boxes"
    if not (boxes / "part-0.parquet").is_file():
        truth, sizes = load_coco_boxes(sample / "gt_boxes.json")
        classes = (sample / "classes.txt").read_text().split()
        ids = sorted(truth)  # the sample's image ids are CLASS/FILE
        boxes.mkdir(parents=True, exist_ok=True)
        partial = boxes / ".part-0.parquet.partial"
        pq.write_table(pa.table({
            "image_id": ids, "label": [classes.index(i.split("/")[0]) for i in ids],
            "width": [sizes[i][0] for i in ids], "height": [sizes[i][1] for i in ids],
            "boxes": [truth[i].tolist() for i in ids], "scores": [[1.0] * len(truth[i]) for i in ids]},
            schema=BOXES_SCHEMA), partial)
        partial.replace(boxes / "part-0.parquet")
        (boxes.parent / "config.yaml").write_text(yaml.safe_dump(
            {"input": str(sample / "images"), "format": "folder", "class_map": str(sample / "classes.txt")}))
    return boxes


def sample_downstream(cache: str | Path | None = None) -> Path:
    """The built-in downstream sample (new classes; COCO JSON and VOC layout), generated on first use."""
    from dap_ray.data.downstream_sample import DownstreamSampleConfig, make_downstream_sample

    folder = sample_cache(cache) / "downstream"
    if not (folder / "downstream_config.json").is_file():
        print(f"first run: generating the built-in downstream sample in {folder} (seconds)", flush=True)
        make_downstream_sample(folder, DownstreamSampleConfig())
    return folder


def finetune_defaults(cfg: FinetuneConfig, cache: str | Path | None = None) -> FinetuneConfig:
    """``cfg`` as it is when it names training data; else the downstream sample, fine-tuned from the
    sample's DAP pre-training (made on first use) unless ``init`` says otherwise.

    Options the user left at the paper's defaults become the sample's small run
    (:data:`SAMPLE_FINETUNE`; its length only without a ``kshot_table``, whose iterations
    for K then count); options the user set are kept.
    """
    from dap_ray.steps.finetune import FinetuneConfig

    if cfg.train is not None:
        return cfg
    folder = sample_downstream(cache)
    defaults = FinetuneConfig()
    small = {k: v for k, v in SAMPLE_FINETUNE.items() if getattr(cfg, k) == getattr(defaults, k)}
    if cfg.kshot_table:  # the table's iterations for K, not the sample's fixed length
        small.pop("max_iters", None)
    init = cfg.init or f"dap:{sample_pretrained_detector(cache)}"
    print(f"fine-tuning on the built-in downstream sample ({folder}) from {init}", flush=True)
    return dataclasses.replace(cfg, train=str(folder / "coco" / "train.json"), test=str(folder / "coco" / "test.json"),
                               format="coco", train_images=str(folder / "images"), test_images=str(folder / "images"),
                               init=init, preset=cfg.preset or "voc", **small)


def tune_boxes_defaults(cfg: TuneBoxesConfig, cache: str | Path | None = None) -> TuneBoxesConfig:
    """``cfg`` as it is when it names true boxes; else the sample's true boxes and its classifier."""
    if cfg.gt_boxes is not None:
        return cfg
    sample, run = sample_dataset(cache), sample_classifier(cache)
    meta = json.loads((run / "meta.json").read_text())
    print(f"sweeping box settings on the built-in sample's true boxes ({sample / 'gt_boxes.json'})", flush=True)
    return dataclasses.replace(cfg, gt_boxes=str(sample / "gt_boxes.json"), images=str(sample / "images"),
                               classifier=meta["arch"], weights=str(run / "classifier.pt"),
                               class_map=str(sample / "classes.txt"), scales=SAMPLE_SCALES)


def tune_finetune_defaults(cfg: TuneFinetuneConfig, cache: str | Path | None = None) -> TuneFinetuneConfig:
    """``cfg`` as it is when it names training data; else the downstream sample from the sample's DAP
    pre-training, with the sample's fine-tuning sizes (:data:`SAMPLE_FINETUNE`)."""
    if cfg.train is not None:
        return cfg
    folder = sample_downstream(cache)
    init = cfg.init or f"dap:{sample_pretrained_detector(cache)}"
    sizes = {k: v for k, v in SAMPLE_FINETUNE.items() if k in ("min_sizes", "max_size", "batch_size",
                                                                "roi_batch_size_per_image", "test_proposals",
                                                                "loader_workers")}
    print(f"sweeping k-shot fine-tuning on the built-in downstream sample ({folder}) from {init}", flush=True)
    return dataclasses.replace(cfg, train=str(folder / "coco" / "train.json"), train_images=str(folder / "images"),
                               format="coco", init=init, preset=cfg.preset or "voc", **sizes)
