"""Ray Tune around Steps 2 and 4: search the pseudo-box settings against true boxes, and the
k-shot fine-tuning iterations and learning rate.

:func:`tune_boxes` computes the CAMs of a labelled set once (the built-in sample's true
boxes by default, or a COCO file of the user's own boxes, e.g. ImageNet's validation
boxes) and caches them on disk (:class:`dap_ray.localisation.sweep.CamCache`), then runs one
Tune trial per setting: searched by Optuna's TPE over ranges of the threshold set (start, step,
count) and the NMS IoU and over the presets and component-size rules, in rounds whose ranges
grow past an edge the best sits on (:mod:`dap_ray.search`), or on a grid. Each trial draws
boxes from the cached CAMs and scores them (:func:`dap_ray.localisation.sweep.score_box_config`:
AP50 per class, COCO-style, beside CorLoc and friends) on the tuning split; the best and the
paper's setting (always a trial) are scored once on the held-out split at the end. An
interrupted sweep resumes with the same command (``Tuner.restore``), round by round, keeping
the finished trials.

Outputs in ``OUTPUT``: ``results.csv`` and ``results.parquet`` (one row per trial, best
first), ``results.md``, ``best.yaml`` (the best setting, which ``jobs/mine.py --config``
takes as it is), ``sweep.png`` (AP50 against NMS IoU, one line per threshold set) and
``config.yaml``; the CAMs in ``OUTPUT/cams.npz``.

:func:`tune_finetune` runs one sweep per K over the schedule length and learning rate (Optuna's
TPE on log scales in rounds, or a grid):
each trial is a Step 4 fine-tune (in the trial's process, or on Ray Train inside the trial)
of the K-shot draw, validated every few iterations on training images the draw left out
(never the test split), with successive halving stopping the weak trials early (proposals in
batches and :class:`~dap_ray.steps.tune_callbacks.BatchHalving`, so a rerun searches the same).
It writes the chosen iterations and lr per K as ``kshot_preset.yaml``, which
``jobs/finetune.py --kshot-table`` reads, with ``results.csv``, ``results.md`` and ``sweep.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from dap_ray.search import describe_edge, describe_rounds, edges_hit, extend
from dap_ray.tracking import MLFLOW_URI_HELP, check_tracking, log_step

__all__ = ["DEFAULT_THRESHOLD_SETS", "TuneBoxesConfig", "TuneFinetuneConfig", "grid_tune_config", "tune_boxes",
           "tune_finetune"]

# Threshold sets on the grid: the paper's, shifted down and up, sparser and denser.
DEFAULT_THRESHOLD_SETS = ("0.2,0.3,0.4,0.5", "0.1,0.2,0.3,0.4", "0.3,0.4,0.5,0.6", "0.2,0.4", "0.15,0.25,0.35,0.45",
                          "0.1,0.2,0.3,0.4,0.5,0.6")
PAPER_DEFAULT = {"thresholds": "0.2,0.3,0.4,0.5", "nms_iou": 0.8, "preset": "official", "size_measure": "rectangle"}
# Settings a rerun may change: how the work is spread, not what is searched or scored.
BOX_SWEEP_OPERATIONAL = ("output", "batch_size", "max_concurrent_trials", "storage_path", "mlflow_uri")
FINETUNE_SWEEP_OPERATIONAL = ("output", "max_concurrent_trials", "storage_path", "loader_workers", "mlflow_uri")


@dataclass(frozen=True)
class TuneBoxesConfig:
    """The box sweep. With no ``gt_boxes`` it runs on the built-in sample's true boxes and classifier."""

    gt_boxes: str | None = field(default=None, metadata={
        "help": "COCO file of true boxes (file_name relative to --images; default: the built-in sample's)"})
    images: str | None = field(default=None, metadata={"help": "folder the true boxes' file names are relative to"})
    classifier: str = field(default="resnet50", metadata={"help": "torchvision name or package.module:factory"})
    weights: str | None = field(default=None, metadata={"help": "classifier state dict"})
    class_map: str | None = field(default=None, metadata={
        "help": "class names in the classifier's order (default: its Step 1 meta.json's); a true box's category "
                "name gives its image's label, else category_id - 1"})
    scales: tuple[int, ...] = field(default=(288, 576), metadata={"help": "CAM short sides"})
    flip: bool = field(default=True, metadata={"help": "average with the mirrored image"})
    output: str = field(default="tune_boxes", metadata={"help": "output folder"})
    search: Literal["optuna", "grid"] = field(default="optuna", metadata={
        "help": "optuna: Optuna's TPE over the ranges below (the paper's setting is its first trial), ranges "
                "grown for another round when the best sits on an edge; grid: every combination of "
                "--threshold-sets and --nms-ious"})
    samples: int = field(default=48, metadata={
        "help": "optuna: trials in the first round (each further round: half as many)"})
    threshold_start_range: tuple[float, float] = field(default=(0.1, 0.4), metadata={
        "help": "optuna: the lowest threshold of the set, from and to"})
    threshold_step_range: tuple[float, float] = field(default=(0.05, 0.15), metadata={
        "help": "optuna: the step between thresholds, from and to"})
    threshold_count_range: tuple[int, int] = field(default=(1, 6), metadata={
        "help": "optuna: how many thresholds, from and to (thresholds at 0.99 or above are dropped)"})
    nms_iou_range: tuple[float, float] = field(default=(0.5, 0.9), metadata={"help": "optuna: NMS IoU, from and to"})
    extend_rounds: int = field(default=2, metadata={
        "help": "optuna: further rounds, each over the ranges grown past the edges the best setting sits on"})
    threshold_sets: tuple[str, ...] = field(default=DEFAULT_THRESHOLD_SETS, metadata={
        "help": "grid: threshold sets to try, each comma-separated (the paper's 0.2,0.3,0.4,0.5 is always added)"})
    nms_ious: tuple[float, ...] = field(default=(0.5, 0.6, 0.7, 0.8, 0.9), metadata={"help": "grid: NMS IoUs to try"})
    presets: tuple[str, ...] = field(default=("official", "paper"), metadata={"help": "presets to try"})
    size_measures: tuple[str, ...] = field(default=("rectangle", "cells"), metadata={
        "help": "component-size rules to try (rectangle area, cell count)"})
    report_fraction: float = field(default=0.5, metadata={
        "help": "share of the labelled images held out of the search: the best and the paper's setting are "
                "scored on them once at the end (0: select and report on the same images, optimistic)"})
    seed: int = field(default=0, metadata={"help": "the tuning/report split and the searcher's seed"})
    mlflow_uri: str | None = field(default=None, metadata={
        "help": MLFLOW_URI_HELP + "; a parent run with one child per trial"})
    limit: int | None = field(default=None, metadata={"help": "use at most this many labelled images"})
    batch_size: int = field(default=32, metadata={"help": "images per CAM batch"})
    max_concurrent_trials: int | None = field(default=None, metadata={
        "help": "trials at once (default: one per CPU of the cluster)"})
    storage_path: str | None = field(default=None, metadata={
        "help": "where Tune keeps the sweep's state (default OUTPUT/ray; shared storage on a cluster)"})

    def __post_init__(self) -> None:
        for text in self.threshold_sets:
            _thresholds(text)
        for name, allowed in (("presets", ("official", "paper")), ("size_measures", ("rectangle", "cells"))):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"{name} must be some of {allowed}, got {getattr(self, name)}")
        if not self.nms_ious or any(not 0 <= v <= 1 for v in self.nms_ious):
            raise ValueError(f"nms_ious must lie in [0, 1], got {self.nms_ious}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1, got {self.limit}")
        if not 0 <= self.report_fraction < 1:
            raise ValueError(f"report_fraction lies in [0, 1), got {self.report_fraction}")
        if self.samples < 1 or self.extend_rounds < 0:
            raise ValueError(f"samples must be at least 1 and extend_rounds at least 0, got {self.samples}, "
                             f"{self.extend_rounds}")
        self.search_ranges()  # a bad range fails here, naming it

    def search_ranges(self) -> list:
        """The optuna search's ranges (:class:`dap_ray.search.SearchRange`), with the hard limits they may grow to."""
        from dap_ray.search import SearchRange

        for name in ("threshold_start_range", "threshold_step_range", "threshold_count_range", "nms_iou_range"):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"{name} is two numbers, from and to; got {getattr(self, name)}")
        return [SearchRange("threshold_start", *self.threshold_start_range, limit_low=0.01, limit_high=0.95),
                SearchRange("threshold_step", *self.threshold_step_range, limit_low=0.01, limit_high=0.3),
                SearchRange("threshold_count", *self.threshold_count_range, limit_low=1, limit_high=10, integer=True),
                SearchRange("nms_iou", *self.nms_iou_range, limit_low=0.3, limit_high=1.0)]

    def grid(self) -> dict:
        """The search space, the paper's defaults always on it."""
        sets = list(dict.fromkeys([PAPER_DEFAULT["thresholds"], *(",".join(str(t) for t in _thresholds(s))
                                                                   for s in self.threshold_sets)]))
        return {"thresholds": sets, "nms_iou": sorted({*self.nms_ious, PAPER_DEFAULT["nms_iou"]}),
                "preset": list(dict.fromkeys(["official", *self.presets])),
                "size_measure": list(dict.fromkeys(["rectangle", *self.size_measures]))}


def _thresholds(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"a threshold set is numbers separated by commas, got {text!r}") from None
    if not values or any(not 0 <= v < 1 for v in values):
        raise ValueError(f"thresholds lie in [0, 1), got {text!r}")
    return values


def _labelled_images(cfg: TuneBoxesConfig):
    """The ground truth, (image_id, label, image) for each of its images, and label -> category id."""
    from dap_ray.data.images import BadImageError, classifier_classes, decode_image, read_class_map

    ground_truth = json.loads(Path(cfg.gt_boxes).read_text())
    for key in ("images", "annotations", "categories"):
        if not isinstance(ground_truth.get(key), list):
            raise ValueError(f"{cfg.gt_boxes} is not a COCO file: no {key!r} list")
    classes = read_class_map(cfg.class_map) if cfg.class_map else classifier_classes(cfg.weights)
    by_name = {c["name"]: c["id"] for c in ground_truth["categories"]}
    if classes and all(name in by_name for name in classes):
        category_ids = [by_name[name] for name in classes]
    else:
        top = max(c["id"] for c in ground_truth["categories"])
        category_ids = list(range(1, top + 1))
    label_of = {cid: label for label, cid in enumerate(category_ids)}
    first: dict[int, int] = {}
    for annotation in ground_truth["annotations"]:
        first.setdefault(annotation["image_id"], annotation["category_id"])
    images = [i for i in ground_truth["images"] if first.get(i["id"]) in label_of]
    if cfg.limit:
        images = images[: cfg.limit]
    if not images:
        raise ValueError(f"no image of {cfg.gt_boxes} has a true box of a class the classifier knows")
    kept = {i["id"] for i in images}
    ground_truth = {**ground_truth, "images": images,
                    "annotations": [a for a in ground_truth["annotations"] if a["image_id"] in kept]}

    def items():
        for image in images:
            path = Path(cfg.images) / image["file_name"]
            try:
                pixels = decode_image(path.read_bytes())
            except (OSError, BadImageError) as exc:
                print(f"warning: skipping {path}: {exc}", flush=True)
                continue
            yield image["file_name"], label_of[first[image["id"]]], pixels

    return ground_truth, items(), category_ids


def _box_trial(config: dict, cache, ground_truth: dict, category_ids: list) -> None:
    """One Tune trial: boxes from the cached CAMs under ``config``, scored against the true boxes."""
    import ray.tune

    from dap_ray.localisation.sweep import score_box_config

    box = _box_config({**config, "thresholds": _trial_thresholds(config)}, cache.scale)
    ray.tune.report(score_box_config(cache, cache.cams(), ground_truth, box, category_ids))


def _trial_thresholds(config: dict) -> str:
    """A trial's threshold set, comma-separated: the grid's as it is, the search's from its start, step and count."""
    from dap_ray.search import threshold_set

    if "thresholds" in config:
        return config["thresholds"]
    values = threshold_set(config["threshold_start"], config["threshold_step"], config["threshold_count"])
    return ",".join(f"{v:g}" for v in values)


def grid_tune_config(concurrent: int, seed: int, scheduler=None):
    """A ``TuneConfig`` for a grid sweep, maximising ``AP50``, at most ``concurrent`` trials at once.

    The limit goes to the grid's generator: beside a generator-type ``search_alg`` Tune ignores
    ``max_concurrent_trials`` (with a warning) and starts every trial the resources allow, which
    for trials holding 0.01 CPU while their Ray Train workers wait for CPUs means a deadlock.
    """
    import ray.tune
    from ray.tune.search import BasicVariantGenerator

    return ray.tune.TuneConfig(metric="AP50", mode="max", scheduler=scheduler,
                               search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=concurrent))


# A trial lost with its node (a spot instance reclaimed, a node that died) runs again from its start,
# up to this many times; its sweep's finished trials are kept.
TRIAL_RETRIES = 3


def _tuner(experiment: Path, trainable, space: dict, tune_config, trials: int, label: str):
    """The sweep in ``experiment`` (a folder under the run's storage) resumed, finished trials kept
    and errored ones retried, or a new one over ``space``; a failed trial runs again up to
    :data:`TRIAL_RETRIES` times. A line as each of its ``trials`` ends, prefixed ``label``: how
    many are done, the rate and the time left (Tune's own table is off, ``verbose=0``)."""
    import ray.tune

    from dap_ray.steps.tune_callbacks import TrialLines

    if ray.tune.Tuner.can_restore(str(experiment)):
        print(f"resuming the sweep in {experiment}: finished trials are kept", flush=True)
        return ray.tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                      resume_errored=False, restart_errored=True)
    return ray.tune.Tuner(trainable, param_space=space, tune_config=tune_config,
                          run_config=ray.tune.RunConfig(name=experiment.name, storage_path=str(experiment.parent),
                                                        verbose=0, callbacks=[TrialLines(trials, label)],
                                                        failure_config=ray.tune.FailureConfig(max_failures=TRIAL_RETRIES)))


def tune_boxes(cfg: TuneBoxesConfig) -> dict:
    """Run the sweep (resuming one that was interrupted) and write its outputs; return the best row."""
    import ray
    import ray.tune

    from dap_ray.config import config_to_dict, save_config
    from dap_ray.localisation.cam import CamExtractor
    from dap_ray.localisation.sweep import CamCache, compute_cam_cache, fingerprint, score_box_config
    from dap_ray.models.classifiers import load_classifier
    from dap_ray.runs import check_same_settings, open_run
    from dap_ray.steps.ray_setup import init_ray, run_storage

    if cfg.gt_boxes is None or cfg.images is None:
        raise ValueError("give --gt-boxes and --images (the jobs fill in the built-in sample: dap_ray.steps.embedded)")
    absolute = {k: str(Path(getattr(cfg, k)).resolve()) for k in ("gt_boxes", "images", "weights", "class_map")
                if getattr(cfg, k)}
    cfg = dataclasses.replace(cfg, **absolute)
    for name in ("gt_boxes", "weights", "class_map"):
        if getattr(cfg, name) and not Path(getattr(cfg, name)).is_file():
            raise ValueError(f"--{name.replace('_', '-')} not found: {getattr(cfg, name)}")
    uri = check_tracking(cfg.mlflow_uri, cfg.output)
    if cfg.weights is None:
        print(f"warning: no --weights: the CAMs come from {cfg.classifier} as its factory builds it (a random "
              "classifier's CAMs say nothing about box settings)", flush=True)
    with open_run(Path(cfg.output).resolve()) as output:
        ground_truth, items, category_ids = _labelled_images(cfg)
        key = fingerprint(gt_boxes=cfg.gt_boxes, images=cfg.images, classifier=cfg.classifier, weights=cfg.weights,
                          class_map=cfg.class_map, scales=list(cfg.scales), flip=cfg.flip, limit=cfg.limit)
        cache = CamCache.load(output / "cams.npz", key)
        if cache is None:
            print(f"computing the CAMs of {len(ground_truth['images'])} labelled images once "
                  f"({cfg.classifier}, scales {cfg.scales})", flush=True)
            model = load_classifier(cfg.classifier, cfg.weights, num_classes=len(category_ids) if not cfg.weights else None)
            cache = compute_cam_cache(items, CamExtractor(model, scales=cfg.scales, flip=cfg.flip), cfg.batch_size)
            cache.save(output / "cams.npz", key)
        else:
            print(f"using the cached CAMs of {len(cache)} images ({output / 'cams.npz'})", flush=True)
        # A rerun resumes the sweep as it was: other settings would mix two sweeps' trials.
        check_same_settings(output, config_to_dict(cfg), "a box sweep", except_keys=BOX_SWEEP_OPERATIONAL)
        save_config(cfg, output / "config.yaml")

        tuning, report = _split_ground_truth(ground_truth, cfg.report_fraction, cfg.seed)
        init_ray()
        storage = run_storage(cfg.storage_path, output)
        trainable = ray.tune.with_parameters(_box_trial, cache=cache, ground_truth=tuning, category_ids=category_ids)
        concurrent = cfg.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1)))
        print(f"{len(tuning['images'])} images to select on, {len(report['images'])} held out to report on",
              flush=True)
        if cfg.search == "grid":
            rows, errors, trials = _box_grid(cfg, trainable, storage / "boxes", concurrent)
            rounds: list[dict] = []
        else:
            rows, errors, trials, rounds = _box_search(cfg, trainable, storage, concurrent)
        reported = None
        if report["images"]:
            cams = cache.cams()
            best = max(rows, key=_ap50)
            default = next((r for r in rows if _is_default(r)), PAPER_DEFAULT)
            reported = {name: score_box_config(cache, cams, report, _box_config(row, cache.scale), category_ids)
                        for name, row in (("best", best), ("default", default))}
        summary = _write_outputs(cfg, output, rows, errors, trials, reported=reported, rounds=rounds)
    final = {f"best/{k}": summary["best"].get(k) for k in _METRICS}
    if reported:
        final.update({f"held_out/{name}/{k}": reported[name].get(k) for name in reported for k in _METRICS})
    log_step(uri, "tune_boxes", output, config_to_dict(cfg), final=final,
             artifacts=("config.yaml", "results.md", "results.csv", "best.yaml", "sweep.png", "summary.json"),
             children=[(f"rank {r['rank']}", {k: v for k, v in r.items() if k not in _METRICS},
                        [], {k: r.get(k) for k in _METRICS}) for r in rows])
    return summary


def _ap50(row: dict) -> float:
    value = row.get("AP50")
    return -1.0 if value is None or math.isnan(value) else value


def _split_ground_truth(ground_truth: dict, report_fraction: float, seed: int) -> tuple[dict, dict]:
    """(tuning, report): the COCO dict's images shuffled with ``seed`` and cut, ``report_fraction``
    of them to report on; each with its own annotations. The report part is empty at fraction 0."""
    import numpy as np

    images = sorted(ground_truth["images"], key=lambda image: image["id"])
    order = np.random.default_rng(seed).permutation(len(images))
    held = round(len(images) * report_fraction)
    if report_fraction > 0 and not 1 <= held < len(images):
        raise ValueError(f"{len(images)} labelled images cannot be split with report_fraction {report_fraction}: "
                         "each part needs at least one")
    report_ids = {images[i]["id"] for i in order[:held]}

    def part(keep) -> dict:
        return {**ground_truth, "images": [i for i in images if keep(i["id"])],
                "annotations": [a for a in ground_truth["annotations"] if keep(a["image_id"])]}

    return part(lambda i: i not in report_ids), part(lambda i: i in report_ids)


def _box_config(row: dict, scale: int):
    """The :class:`BoxConfig` of a sweep row (or setting): its threshold set, NMS IoU, preset, size rule."""
    from dap_ray.localisation.boxes import BoxConfig

    return BoxConfig.from_preset(row["preset"], scale=scale, thresholds=_thresholds(row["thresholds"]),
                                 nms_iou=row["nms_iou"], size_measure=row["size_measure"])


_METRICS = ("AP50", "AP", "VOC_AP50", "corloc", "any_hit", "mean_best_iou", "boxes_per_image", "images")


def _box_rows(results, keys) -> tuple[list[dict], int]:
    """One row per trial that reported (the setting's ``keys`` and its metrics), and how many failed."""
    rows = []
    for result in results:
        if result.error is not None:
            print(f"warning: a trial failed: {str(result.error).splitlines()[0]}", flush=True)
            continue
        metrics = result.metrics or {}
        rows.append({**{k: result.config[k] for k in keys}, "thresholds": _trial_thresholds(result.config),
                     **{k: metrics.get(k) for k in _METRICS}})
    return rows, results.num_errors


def _box_grid(cfg: TuneBoxesConfig, trainable, experiment: Path, concurrent: int) -> tuple[list[dict], int, int]:
    import ray.tune

    grid = cfg.grid()
    space = {name: ray.tune.grid_search(values) for name, values in grid.items()}
    trials = math.prod(len(v) for v in grid.values())
    tuner = _tuner(experiment, trainable, space, grid_tune_config(concurrent, seed=0), trials, "box grid")
    print(f"sweeping a grid of {trials} box settings, {concurrent} trials at a time", flush=True)
    rows, errors = _box_rows(tuner.fit(), grid)
    if not rows:
        raise RuntimeError(f"every trial of the sweep failed; see the logs under {experiment}")
    return rows, errors, trials


def _box_search(cfg: TuneBoxesConfig, trainable, storage: Path, concurrent: int):
    """Optuna's TPE over the threshold set (start, step, count), NMS IoU, preset and size rule,
    the paper's setting first; then up to ``cfg.extend_rounds`` rounds over ranges grown past the
    edges the best setting sits on, each told every earlier trial's result. Returns the rows,
    failed trials, trials run and one record per round (its ranges, best AP50, edges hit and
    what was done about each)."""

    ranges = cfg.search_ranges()
    choices = {"preset": list(dict.fromkeys(["official", *cfg.presets])),
               "size_measure": list(dict.fromkeys(["rectangle", *cfg.size_measures]))}
    paper = {"threshold_start": 0.2, "threshold_step": 0.1, "threshold_count": 4,
             **{k: PAPER_DEFAULT[k] for k in ("nms_iou", "preset", "size_measure")}}
    keys = [r.name for r in ranges] + list(choices)
    rows: list[dict] = []
    rounds: list[dict] = []
    errors = trials = 0
    for number in range(cfg.extend_rounds + 1):
        samples = cfg.samples if number == 0 else max(1, cfg.samples // 2)
        first = [paper] if number == 0 and all(r.low <= paper[r.name] <= r.high for r in ranges) else []
        experiment = storage / ("boxes" if number == 0 else f"boxes_round{number}")
        print(f"round {number + 1}: {samples} settings searched by Optuna (TPE) over "
              + ", ".join(f"{r.name} [{r.low:g}, {r.high:g}]" for r in ranges) + f", {concurrent} trials at a time",
              flush=True)
        tuner = _tuner(experiment, trainable, {}, _search_tune_config(
            ranges, choices, "AP50", samples, concurrent, cfg.seed + number, first=first,
            evaluated=[({k: row[k] for k in keys}, row["AP50"]) for row in rows if _ap50(row) >= 0], batch=True),
            samples, f"box search, round {number + 1}")
        found, failed = _box_rows(tuner.fit(), keys)
        for row in found:
            row["round"] = number + 1
        rows += found
        errors += failed
        trials += samples
        if not rows:
            raise RuntimeError(f"every trial of the sweep failed; see the logs under {experiment}")
        best = max(rows, key=_ap50)
        hits = edges_hit(ranges, best, rounds_left=cfg.extend_rounds - number)
        rounds.append({"round": number + 1, "ranges": {r.name: [r.low, r.high] for r in ranges},
                       "trials": samples, "best_AP50": best["AP50"], "edges": hits})
        for hit in hits:
            print(f"round {number + 1}: {describe_edge(hit)}", flush=True)
        if not any(hit["growable"] for hit in hits):
            break
        ranges = extend(ranges, hits)
    return rows, errors, trials, rounds


def _search_tune_config(ranges, choices: dict, metric: str, samples: int, concurrent: int, seed: int,
                        first: list[dict] = (), evaluated: list[tuple[dict, float]] = (), scheduler=None,
                        batch: bool = False):
    """A ``TuneConfig`` searching ``ranges`` and ``choices`` with Optuna's TPE (seeded), maximising
    ``metric`` over ``samples`` trials, ``concurrent`` at a time; ``first`` are tried first,
    ``evaluated`` (setting, result) are told to the sampler without running again. ``batch``: the
    sampler suggests ``concurrent`` settings at a time and hears their results together, so
    what it suggests does not hang on which trial ended first and a rerun searches the same
    settings; a slot whose trial ended early waits for the batch."""
    import optuna
    import ray.tune
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    space: dict = {}
    for r in ranges:
        kind = optuna.distributions.IntDistribution if r.integer else optuna.distributions.FloatDistribution
        space[r.name] = kind(int(r.low) if r.integer else r.low, int(r.high) if r.integer else r.high, log=r.log)
    for name, values in choices.items():
        space[name] = optuna.distributions.CategoricalDistribution(values)
    points = [dict(p) for p, _ in evaluated] or list(first)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(1, samples // 3)))
    searcher = OptunaSearch(space=space, metric=metric, mode="max", sampler=sampler,
                            points_to_evaluate=points or None,
                            evaluated_rewards=[reward for _, reward in evaluated] or None)
    return ray.tune.TuneConfig(metric=metric, mode="max", scheduler=scheduler, num_samples=samples,
                               search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrent, batch=batch))


def _is_default(row: dict) -> bool:
    return all(row[k] == v for k, v in PAPER_DEFAULT.items())


def _write_outputs(cfg: TuneBoxesConfig, output: Path, rows: list[dict], errors: int, trials: int,
                   reported: dict | None = None, rounds: list[dict] = ()) -> dict:
    """Write the sweep's table (best first, on the tuning split), ``best.yaml``, the plot and
    ``summary.json``: with ``reported``, the best and the paper's setting scored on the held-out
    split; with ``rounds``, the search's rounds and the range edges its best sits on."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    rows.sort(key=lambda r: (-(r["AP50"] if r["AP50"] is not None and not math.isnan(r["AP50"]) else -1.0),
                             r["thresholds"], r["nms_iou"], r["preset"], r["size_measure"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
        row["default"] = _is_default(row)
    table = pa.Table.from_pylist(rows)
    pyarrow.csv.write_csv(table, output / "results.csv")
    pq.write_table(table, output / "results.parquet")
    best = rows[0]
    default = next((r for r in rows if r["default"]), None)
    best_yaml = {"thresholds": list(_thresholds(best["thresholds"])), "nms_iou": best["nms_iou"],
                 "preset": best["preset"], "size_measure": best["size_measure"]}
    (output / "best.yaml").write_text(
        "# The box sweep's best setting (jobs/tune_boxes.py): jobs/mine.py --config best.yaml takes it as it is.\n"
        + yaml.safe_dump(best_yaml, sort_keys=False))
    lines = [f"{len(rows)} of {trials} settings scored ({errors} failed) on {best['images']} images; objective AP50 "
             "(per class, COCO-style); the paper's default is marked *.", "",
             "| rank | thresholds | NMS IoU | preset | size | AP50 | AP | VOC AP50 | CorLoc | any hit | best IoU | boxes/image |",
             "| ---: | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    shown = rows[:20] + ([default] if default is not None and default["rank"] > 20 else [])
    for r in shown:
        lines.append(f"| {r['rank']}{'*' if r['default'] else ''} | {r['thresholds']} | {r['nms_iou']:.3g} | "
                     f"{r['preset']} | {r['size_measure']} | {r['AP50']:.2f} | {r['AP']:.2f} | {r['VOC_AP50']:.2f} | "
                     f"{r['corloc']:.3f} | {r['any_hit']:.3f} | {r['mean_best_iou']:.3f} | {r['boxes_per_image']:.2f} |")
    if reported:
        lines += ["", f"Held out of the search ({reported['best']['images']} images, disjoint from the "
                  f"{best['images']} it selected on), scored once:", "",
                  "| setting | AP50 | AP | CorLoc | any hit | best IoU | boxes/image |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, label in (("best", "the search's best"), ("default", "the paper's")):
            r = reported[name]
            lines.append(f"| {label} | {r['AP50']:.2f} | {r['AP']:.2f} | {r['corloc']:.3f} | {r['any_hit']:.3f} | "
                         f"{r['mean_best_iou']:.3f} | {r['boxes_per_image']:.2f} |")
    else:
        lines += ["", "No images were held out (--report-fraction 0): the figures above are those the setting was "
                  "selected on, so the best one's are optimistic."]
    lines += describe_rounds(list(rounds), "", "best_AP50", "AP50")
    (output / "results.md").write_text("\n".join(lines) + "\n")
    _plot(rows, best, output / "sweep.png")
    summary = {"best": best, "default": default, "trials": trials, "scored": len(rows), "errors": errors,
               "gain_AP50": best["AP50"] - default["AP50"] if default else None, "search": cfg.search,
               "rounds": list(rounds), "edges": rounds[-1]["edges"] if rounds else [],
               "report": reported, "report_gain_AP50": reported["best"]["AP50"] - reported["default"]["AP50"]
               if reported else None}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines[:2 + 2 + min(10, len(shown))]), flush=True)
    print(f"best: {best_yaml} AP50 {best['AP50']:.2f}" + (f" (the default: {default['AP50']:.2f})" if default else "")
          + f" on the images it was selected on; wrote {output / 'best.yaml'}", flush=True)
    if reported:
        print(f"held out ({reported['best']['images']} images): best AP50 {reported['best']['AP50']:.2f}, the "
              f"paper's {reported['default']['AP50']:.2f}", flush=True)
    return summary


def _plot(rows: list[dict], best: dict, path: Path) -> None:
    """AP50 against NMS IoU at the best preset and size rule: one line per threshold set for a grid,
    one point per trial coloured by its lowest threshold for a search."""
    from dap_ray.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4))
    if "round" in best:
        points = [(r["nms_iou"], r["AP50"], _thresholds(r["thresholds"])[0]) for r in rows if _ap50(r) >= 0]
        drawn = axis.scatter([p[0] for p in points], [p[1] for p in points], c=[p[2] for p in points], cmap="viridis",
                             s=18)
        figure.colorbar(drawn, ax=axis, label="lowest threshold")
        axis.scatter([best["nms_iou"]], [best["AP50"]], marker="*", s=160, color="red", label="best")
        default = next((r for r in rows if _is_default(r)), None)
        if default is not None:
            axis.scatter([default["nms_iou"]], [default["AP50"]], marker="s", s=60, facecolors="none",
                         edgecolors="black", label="the paper's")
        axis.set_xlabel("NMS IoU")
        axis.set_ylabel("AP50 of the pseudo boxes (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        save_figure(plt, figure, path, f"box search: {len(points)} trials (all presets and size rules)")
        return
    chosen = [r for r in rows if r["preset"] == best["preset"] and r["size_measure"] == best["size_measure"]]
    for thresholds in sorted({r["thresholds"] for r in chosen}):
        points = sorted((r["nms_iou"], r["AP50"]) for r in chosen if r["thresholds"] == thresholds)
        axis.plot(*zip(*points), marker="o", label=thresholds)
    axis.set_xlabel("NMS IoU")
    axis.set_ylabel("AP50 of the pseudo boxes (%)")
    axis.grid(alpha=0.3)
    axis.legend(title="thresholds", fontsize=8)
    save_figure(plt, figure, path, f"box sweep ({best['preset']} preset, {best['size_measure']} size)")


@dataclass(frozen=True)
class TuneFinetuneConfig:
    """The k-shot sweep: iterations and learning rate per K, scored on a validation split carved from
    the training data (never the test split), weak trials stopped early by successive halving."""

    train: str | None = field(default=None, metadata={
        "help": "training set, as jobs/finetune.py takes it (default: the built-in downstream sample)"})
    format: Literal["coco", "voc"] = field(default="coco", metadata={"help": "coco: annotation JSON; voc: VOCdevkit"})
    train_images: str | None = field(default=None, metadata={"help": "COCO: folder of the training images"})
    train_splits: tuple[str, ...] = field(default=("2007:trainval",), metadata={"help": "VOC: YEAR:SPLIT lists"})
    init: str | None = field(default=None, metadata={
        "help": "dap:RUN_DIR, cls:FILE or scratch (default with the sample: its DAP pre-training)"})
    output: str = field(default="tune_finetune", metadata={"help": "output folder"})
    shots: tuple[int, ...] = field(default=(5, 10), metadata={"help": "the K to tune, one sweep each"})
    search: Literal["optuna", "grid"] = field(default="optuna", metadata={
        "help": "optuna: Optuna's TPE over --iterations-range and --lr-range (log scales), ranges grown for another "
                "round when the best sits on an edge; grid: every pair of --iterations and --lrs"})
    samples: int = field(default=8, metadata={"help": "optuna: trials per K in the first round (further rounds: half)"})
    iterations_range: tuple[int, int] = field(default=(20, 160), metadata={
        "help": "optuna: schedule lengths, from and to (each trial's lr steps scale with its own length; a range "
                "may grow to 4x its upper end)"})
    lr_range: tuple[float, float] = field(default=(0.001, 0.04), metadata={
        "help": "optuna: learning rates, from and to"})
    extend_rounds: int = field(default=1, metadata={
        "help": "optuna: further rounds per K, each over the ranges grown past the edges the best sits on"})
    iterations: tuple[int, ...] = field(default=(20, 40, 80), metadata={
        "help": "grid: schedule lengths to try (each trial's lr steps scale with its own length)"})
    lrs: tuple[float, ...] = field(default=(0.0025, 0.01), metadata={"help": "grid: learning rates to try"})
    val_images: int = field(default=60, metadata={
        "help": "validation images drawn from the training images the k-shot draw left out"})
    evals_per_trial: int = field(default=4, metadata={
        "help": "validations along each trial's schedule, evenly spaced (successive halving compares trials at "
                "the same share of their own schedules)"})
    seed: int = field(default=0, metadata={"help": "k-shot draw, validation draw and training seed"})
    workers_per_trial: int = field(default=0, metadata={
        "help": "Ray Train workers inside each trial (0: the trial trains in its own process)"})
    max_concurrent_trials: int | None = field(default=None, metadata={
        "help": "trials at once (default: one per CPU of the cluster, less one when trials start Ray Train)"})
    storage_path: str | None = field(default=None, metadata={
        "help": "where Tune keeps the sweeps' state (default OUTPUT/ray; shared storage on a cluster)"})
    mlflow_uri: str | None = field(default=None, metadata={
        "help": MLFLOW_URI_HELP + "; a parent run per sweep with one child per trial"})
    # The fine-tuning settings every trial shares (jobs/finetune.py's; the sample's when it runs).
    detector: Literal["faster_rcnn_fpn", "retinanet_fpn"] | None = field(default=None, metadata={
        "help": "as jobs/finetune.py --detector"})
    backbone: str | None = field(default=None, metadata={"help": "as jobs/finetune.py --backbone"})
    preset: Literal["voc", "coco"] | None = field(default=None, metadata={"help": "as jobs/finetune.py --preset"})
    min_sizes: tuple[int, ...] | None = field(default=None, metadata={"help": "as jobs/finetune.py --min-sizes"})
    max_size: int | None = field(default=None, metadata={"help": "as jobs/finetune.py --max-size"})
    batch_size: int = field(default=2, metadata={"help": "images per worker per iteration"})
    roi_batch_size_per_image: int = field(default=512, metadata={"help": "as jobs/finetune.py"})
    test_proposals: int = field(default=1000, metadata={"help": "as jobs/finetune.py"})
    loader_workers: int = field(default=0, metadata={"help": "DataLoader processes per trial or worker"})

    def __post_init__(self) -> None:
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"shots must be positive, got {self.shots}")
        if not self.iterations or min(self.iterations) < 1 or not self.lrs or min(self.lrs) <= 0:
            raise ValueError("iterations must be positive numbers and lrs positive")
        for name in ("val_images", "evals_per_trial", "batch_size", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.extend_rounds < 0:
            raise ValueError(f"extend_rounds must be at least 0, got {self.extend_rounds}")
        self.search_ranges()  # a bad range fails here, naming it

    def search_ranges(self) -> list:
        """The optuna search's ranges (:class:`dap_ray.search.SearchRange`), on log scales."""
        from dap_ray.search import SearchRange

        for name in ("iterations_range", "lr_range"):
            if len(getattr(self, name)) != 2:
                raise ValueError(f"{name} is two numbers, from and to; got {getattr(self, name)}")
        low, high = self.iterations_range
        return [SearchRange("max_iters", low, high, limit_low=1, limit_high=4 * high, log=True, integer=True),
                SearchRange("lr", *self.lr_range, limit_low=1e-5, limit_high=0.2, log=True)]

    def finetune_config(self):
        """The :class:`dap_ray.steps.finetune.FinetuneConfig` every trial starts from."""
        from dap_ray.steps.finetune import FinetuneConfig

        return FinetuneConfig(
            train=self.train, format=self.format, train_images=self.train_images, train_splits=self.train_splits,
            init=self.init, detector=self.detector, backbone=self.backbone, preset=self.preset,
            min_sizes=self.min_sizes, max_size=self.max_size, batch_size=self.batch_size,
            num_workers=max(1, self.workers_per_trial), roi_batch_size_per_image=self.roi_batch_size_per_image,
            test_proposals=self.test_proposals, loader_workers=self.loader_workers, log_every_s=1e9)


def _finetune_trial(config: dict, base: dict, train, val, seed: int, workers: int, evals: int) -> None:
    """One Tune trial: a Step 4 fine-tune of ``config['max_iters']`` iterations at ``config['lr']``,
    validated ``evals`` times along its schedule (``AP50`` etc. on ``val``, and ``progress``: the
    share of its own schedule done, in percent, which successive halving compares trials at)."""
    import ray.tune
    import torch

    from dap_ray.steps.finetune import FinetuneConfig, resolve_schedule

    iters = config["max_iters"]
    cfg = resolve_schedule(dataclasses.replace(FinetuneConfig(**base), max_iters=iters, lr=config["lr"],
                                               checkpoint_every=iters, eval_every=max(1, iters // evals)), len(train))
    from dap_ray.config import config_to_dict

    if workers:
        from ray.tune.integration.ray_train import TuneReportCallback

        from dap_ray.steps.finetune import _train_loop
        from dap_ray.steps.ray_setup import fit_torch_trainer

        # Ray Train reports the metrics of the loop; the scheduler then compares trials by iteration.
        trial = Path(ray.tune.get_context().get_trial_dir())
        # Every report must carry AP50 for Tune, so no extra checkpoint on a preemption notice.
        fit_torch_trainer(_train_loop, {"config": config_to_dict(cfg), "train": train, "test": val, "seed": seed,
                                        "output": str(trial), "checkpoint_on_notice": False},
                          name=f"train-{ray.tune.get_context().get_trial_id()}", storage=trial / "train",
                          num_workers=workers, use_gpu=cfg.use_gpu, cpus=1, max_failures=0, state_file=None,
                          callbacks=[TuneReportCallback()])
        return
    from dap_ray.models.detectors import initialise
    from dap_ray.steps.detector_loop import train_iterations
    from dap_ray.steps.finetune import _evaluate, build_model, make_optimizer, training_loader

    torch.manual_seed(seed)
    model = build_model(cfg, len(train.classes))
    initialise(model, cfg.init, detector=cfg.detector, backbone=cfg.backbone)
    optimizer, scheduler = make_optimizer(cfg, model)
    device = torch.device("cpu")
    torch.manual_seed(seed + 1)

    def evaluate(done: int) -> dict:
        scores, _ = _evaluate(model, val, cfg, 0, 1, device)
        return {"progress": round(100 * done / iters), **{k: scores[k] for k in ("AP", "AP50", "VOC_AP50")}}

    try:
        train_iterations(model, optimizer, scheduler, iter(training_loader(cfg, train, seed)), device, rank=0,
                         world=1, start=0, max_iters=cfg.max_iters, checkpoint_every=cfg.max_iters, log_every_s=1e9,
                         history=[], eval_every=cfg.eval_every, evaluate=evaluate, report=ray.tune.report)
    except FloatingPointError as exc:
        # A schedule that diverges is a result, the worst one: reported as such (not an error,
        # which Tune would run again, diverging again, TRIAL_RETRIES times).
        print(f"this schedule diverged: {exc}", flush=True)
        ray.tune.report({"progress": 100, "iteration": iters, "AP": 0.0, "AP50": 0.0, "VOC_AP50": 0.0,
                         "diverged": 1})


def _kshot_sweep(cfg: TuneFinetuneConfig, k: int, trainable, storage: Path, concurrent: int, curves: dict):
    """The sweeps of one K: a grid, or Optuna's rounds (a round over ranges grown past the edges
    the best sits on, told every earlier trial's result), proposed a batch at a time. BatchHalving
    stops weak trials at shares of their own schedules. Returns its rows, the best trial that ran
    to the end, and one record per round; adds each trial's validation curve to ``curves``."""
    import ray.tune

    from dap_ray.steps.tune_callbacks import BatchHalving

    ranges = cfg.search_ranges()
    rows: list[dict] = []
    rounds: list[dict] = []
    for number in range(1 if cfg.search == "grid" else cfg.extend_rounds + 1):
        # Rungs at shares of each trial's own schedule: a short schedule has decayed its rate by
        # its end, a long one has barely warmed up at the same iteration.
        experiment = storage / (f"finetune_k{k}" if number == 0 else f"finetune_k{k}_round{number}")
        state = experiment / "batch_halving.json"
        if not ray.tune.Tuner.can_restore(str(experiment)):
            state.unlink(missing_ok=True)  # from a sweep that died before Tune saved it: not this one's
        scheduler = BatchHalving(time_attr="progress", max_t=100, grace_period=max(1, 100 // cfg.evals_per_trial),
                                 reduction_factor=2, state_file=str(state))
        if cfg.search == "grid":
            samples = len(cfg.iterations) * len(cfg.lrs)
            space = {"max_iters": ray.tune.grid_search(list(cfg.iterations)), "lr": ray.tune.grid_search(list(cfg.lrs))}
            tune_config = grid_tune_config(concurrent, seed=cfg.seed, scheduler=scheduler)
            print(f"K = {k}: a grid of {samples} schedules", flush=True)
        else:
            samples = cfg.samples if number == 0 else max(1, cfg.samples // 2)
            space = {}
            tune_config = _search_tune_config(
                ranges, {}, "AP50", samples, concurrent, cfg.seed + number, scheduler=scheduler,
                evaluated=[({"max_iters": r["max_iters"], "lr": r["lr"]}, r["val_AP50"]) for r in rows
                           if r["val_AP50"] == r["val_AP50"]], batch=True)
            print(f"K = {k}, round {number + 1}: {samples} schedules searched by Optuna (TPE) over "
                  + ", ".join(f"{r.name} [{r.low:g}, {r.high:g}]" for r in ranges), flush=True)
        results = _tuner(experiment, trainable, space, tune_config, samples,
                         f"K = {k}" + ("" if cfg.search == "grid" else f", round {number + 1}")).fit()
        for result in results:
            if result.error is not None:
                print(f"warning: K = {k}: a trial failed: {str(result.error).splitlines()[0]}", flush=True)
                continue
            history = result.metrics_dataframe
            points = [] if history is None or "AP50" not in history else [
                (int(i), float(a)) for i, a in zip(history["iteration"], history["AP50"]) if a == a]
            curves[_curve_name({"shots": k, **result.config})] = points
            last = points[-1] if points else (0, float("nan"))
            diverged = bool((result.metrics or {}).get("diverged"))
            rows.append({"shots": k, "max_iters": result.config["max_iters"], "lr": result.config["lr"],
                         "iterations_run": last[0], "val_AP50": last[1], "diverged": diverged,
                         "stopped_early": last[0] < result.config["max_iters"], "round": number + 1})
        finished = [r for r in rows if not r["stopped_early"] and r["val_AP50"] == r["val_AP50"]]
        if not finished:
            raise RuntimeError(f"no trial of K = {k} finished; see the logs under {experiment}")
        best = max(finished, key=lambda r: (r["val_AP50"], -r["max_iters"]))
        if cfg.search == "grid":
            break
        hits = edges_hit(ranges, best, rounds_left=cfg.extend_rounds - number)
        for hit in hits:
            print(f"K = {k}, round {number + 1}: {describe_edge(hit)}", flush=True)
        rounds.append({"round": number + 1, "ranges": {r.name: [r.low, r.high] for r in ranges}, "trials": samples,
                       "best_val_AP50": best["val_AP50"], "edges": hits})
        if not any(hit["growable"] for hit in hits):
            break
        ranges = extend(ranges, hits)
    return rows, best, rounds


def tune_finetune(cfg: TuneFinetuneConfig) -> dict:
    """One sweep per K (resuming any that was interrupted); write the results and the chosen
    iterations and lr per K as ``kshot_preset.yaml`` (``jobs/finetune.py --kshot-table``)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv
    import ray
    import ray.tune

    from dap_ray.config import config_to_dict, save_config
    from dap_ray.data.fewshot import sample_k_shot
    from dap_ray.runs import check_same_settings, open_run
    from dap_ray.steps.finetune import load_split, resolve_architecture
    from dap_ray.steps.ray_setup import init_ray, run_storage

    if cfg.train is None or cfg.init is None:
        raise ValueError("give --train and --init (the jobs fill in the built-in sample: dap_ray.steps.embedded)")
    cfg = dataclasses.replace(cfg, **{k: str(Path(getattr(cfg, k)).resolve()) for k in ("train", "train_images")
                                      if getattr(cfg, k)})
    base = resolve_architecture(cfg.finetune_config())
    cfg = dataclasses.replace(cfg, init=base.init, detector=base.detector, backbone=base.backbone)
    train_all = load_split(base, "train")
    uri = check_tracking(cfg.mlflow_uri, cfg.output)
    rows, table, curves, rounds = [], {}, {}, {}
    with open_run(Path(cfg.output).resolve()) as output:
        check_same_settings(output, config_to_dict(cfg), "a k-shot sweep", except_keys=FINETUNE_SWEEP_OPERATIONAL)
        save_config(cfg, output / "config.yaml")
        init_ray()
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # A trial that starts Ray Train holds little itself; its workers need a CPU each of their
        # own, or trials holding every CPU would wait for them forever (Ray issue #54305).
        if cfg.workers_per_trial and cfg.workers_per_trial > cpus:
            problem = (f"--workers-per-trial {cfg.workers_per_trial} needs that many CPUs for one trial's Ray Train "
                       f"workers; the cluster has {cpus}")
            if not os.environ.get("RAY_ADDRESS"):
                raise ValueError(problem)
            print(f"warning: {problem} (an autoscaling cluster may add them)", flush=True)
        concurrent = cfg.max_concurrent_trials or (
            max(1, cpus // cfg.workers_per_trial) if cfg.workers_per_trial else max(1, cpus))
        storage = run_storage(cfg.storage_path, output)
        for k in cfg.shots:
            chosen, _ = sample_k_shot(train_all, k, cfg.seed)
            rest = np.setdiff1d(np.arange(len(train_all)), chosen)
            val_rows = np.random.default_rng([cfg.seed, k]).permutation(rest)[: cfg.val_images]
            if len(val_rows) == 0:
                raise ValueError(f"K = {k} leaves no training image for validation")
            picked = train_all.subset(chosen)
            train = picked.subset(picked.training_indices())
            val = train_all.subset(np.sort(val_rows))
            trainable = ray.tune.with_parameters(_finetune_trial, base=config_to_dict(base), train=train, val=val,
                                                 seed=cfg.seed, workers=cfg.workers_per_trial,
                                                 evals=cfg.evals_per_trial)
            if cfg.workers_per_trial:
                trainable = ray.tune.with_resources(trainable, {"cpu": 0.01})
            found, best, rounds[k] = _kshot_sweep(cfg, k, trainable, storage, concurrent, curves)
            rows += found
            table[k] = {"max_iters": best["max_iters"], "lr": best["lr"], "val_AP50": best["val_AP50"]}
            print(f"K = {k}: best {best['max_iters']} iterations at lr {best['lr']:g} "
                  f"(validation AP50 {best['val_AP50']:.2f})", flush=True)
        rows.sort(key=lambda r: (r["shots"], -(r["val_AP50"] if r["val_AP50"] == r["val_AP50"] else -1.0)))
        pyarrow.csv.write_csv(pa.Table.from_pylist(rows), output / "results.csv")
        lines = ["| K | iterations | lr | validation AP50 | iterations run | stopped early |",
                 "| ---: | ---: | ---: | ---: | ---: | --- |"]
        lines += [f"| {r['shots']} | {r['max_iters']} | {r['lr']:.3g} | "
                  f"{'diverged' if r['diverged'] else format(r['val_AP50'], '.2f')} | {r['iterations_run']} | "
                  f"{'yes' if r['stopped_early'] else 'no'} |" for r in rows]
        for k, records in rounds.items():
            lines += describe_rounds(records, f"K = {k}, ", "best_val_AP50", "validation AP50")
        (output / "results.md").write_text("\n".join(lines) + "\n")
        preset = {"global_batch": base.global_batch(), "init": base.init, "seed": cfg.seed,
                  "shots": {k: {"max_iters": v["max_iters"], "lr": v["lr"]} for k, v in table.items()}}
        (output / "kshot_preset.yaml").write_text(
            "# Iterations and lr per K from jobs/tune_finetune.py: jobs/finetune.py --kshot-table this file.\n"
            + yaml.safe_dump(preset, sort_keys=False))
        from dap_ray.evaluation.plots import plot_learning_curves

        plot_learning_curves({name: [{"iteration": i, "AP50": a} for i, a in points] for name, points in curves.items()},
                             output / "sweep.png", metrics=("AP50",), title="k-shot sweep: validation AP50")
        print("\n".join(lines), flush=True)
        (output / "summary.json").write_text(json.dumps({"shots": table, "rounds": rounds, "search": cfg.search},
                                                        indent=2))
    log_step(uri, "tune_finetune", output, config_to_dict(cfg),
             final={f"K{k}/{name}": value for k, chosen in table.items() for name, value in chosen.items()},
             artifacts=("config.yaml", "results.md", "results.csv", "kshot_preset.yaml", "sweep.png", "summary.json"),
             children=[(_curve_name(r), {k: r[k] for k in ("shots", "max_iters", "lr", "round")},
                        [{"iteration": i, "val_AP50": a} for i, a in curves.get(_curve_name(r), [])],
                        {k: r[k] for k in ("val_AP50", "iterations_run")}) for r in rows])
    return {"shots": table, "trials": rows, "rounds": rounds}


def _curve_name(row: dict) -> str:
    return f"K={row['shots']} {row['max_iters']} it, lr {row['lr']:.3g}"
