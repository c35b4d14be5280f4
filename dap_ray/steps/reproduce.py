"""A mini reproduction of the paper's claim, end to end on the built-in samples: does a detector
pre-trained on pseudo boxes (DAP) fine-tune better than one whose trunk alone comes from the
classifier (CLS), most of all with few labelled images?

Steps 1 to 3 run on the built-in sample (:mod:`dap_ray.steps.embedded`, cached), then Step 4
(:func:`dap_ray.steps.finetune.finetune`) on the downstream sample, whose classes the
pre-training never saw, from both initialisations at each K images per class and on the
full training split, several seeds each, with the same iterations for both. Every stage is
cached or resumable: a rerun finds what is done. Writes ``OUTPUT/results.json``,
``OUTPUT/results.md`` (AP and AP50, mean +- std over seeds, DAP minus CLS),
``OUTPUT/ap_vs_shots.png`` (the paper's Figures 3/4) and ``OUTPUT/learning_curves.png``
(Figure 5: the full-split runs, evaluated along the way), and each run under
``OUTPUT/<init>_<shots>/``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ReproduceConfig", "reproduce"]


@dataclass(frozen=True)
class ReproduceConfig:
    """The grid. Defaults: K = 5, 10, 20 and all, three seeds, under an hour on 2 CPU cores."""

    output: str = field(default="reproduction", metadata={"help": "folder for the table, figures and runs"})
    shots: tuple[str, ...] = field(default=("5", "10", "20", "all"), metadata={
        "help": "images per class to fine-tune on; 'all' is the full training split"})
    iterations: tuple[int, ...] = field(default=(40, 50, 60, 80), metadata={
        "help": "fine-tuning iterations for each --shots entry (the same for CLS and DAP)"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata={"help": "seeds (k-shot draw, order, fresh layers)"})
    pretrain_iters: int = field(default=400, metadata={
        "help": "DAP pre-training iterations on the sample's pseudo boxes (jobs/pretrain.py's default is 100, "
                "under one epoch of the sample: too short for DAP to beat CLS here, see the README)"})
    curve_points: int = field(default=3, metadata={"help": "evaluations along each full-split run, for the curves"})
    quick: bool = field(default=False, metadata={
        "help": "a first look: K = 5 and all, one seed (about a third of the time)"})

    def __post_init__(self) -> None:
        if len(self.shots) != len(self.iterations):
            raise ValueError(f"give one --iterations entry per --shots entry: {self.shots} vs {self.iterations}")
        for shot in self.shots:
            if shot != "all" and not (shot.isdigit() and int(shot) >= 1):
                raise ValueError(f"--shots entries are positive numbers or 'all', got {shot!r}")
        if min(self.iterations) < 1 or self.pretrain_iters < 1 or self.curve_points < 1:
            raise ValueError("iterations, pretrain_iters and curve_points must be at least 1")
        if not self.seeds:
            raise ValueError("at least one seed")

    def grid(self) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
        """(shots, iterations, seeds) to run: ``quick`` keeps the first and last shots and one seed."""
        if not self.quick:
            return self.shots, self.iterations, self.seeds
        keep = sorted({0, len(self.shots) - 1})
        return tuple(self.shots[i] for i in keep), tuple(self.iterations[i] for i in keep), self.seeds[:1]


def reproduce(cfg: ReproduceConfig) -> dict:
    """Run the grid (cached stages are reused) and write the table and figures; return the table."""
    import dataclasses

    from dap_ray.evaluation.plots import plot_learning_curves, plot_metric_vs_shots
    from dap_ray.steps.embedded import (
        SAMPLE_FINETUNE,
        sample_classifier,
        sample_downstream,
        sample_pretrained_detector,
    )
    from dap_ray.steps.finetune import FinetuneConfig, finetune

    started = time.perf_counter()
    output = Path(cfg.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    shots, iterations, seeds = cfg.grid()
    classifier = sample_classifier() / "classifier.pt"
    pretrained = sample_pretrained_detector(**({} if cfg.pretrain_iters == 100 else {"max_iters": cfg.pretrain_iters}))
    downstream = sample_downstream()
    inits = {"CLS": f"cls:{classifier}", "DAP": f"dap:{pretrained}"}
    meta = json.loads((pretrained / "meta.json").read_text())
    base = FinetuneConfig(
        train=str(downstream / "coco" / "train.json"), test=str(downstream / "coco" / "test.json"), format="coco",
        train_images=str(downstream / "images"), test_images=str(downstream / "images"), preset="voc",
        detector=meta["detector"], backbone=meta["backbone"], seeds=tuple(seeds), **SAMPLE_FINETUNE)
    table: dict = {"inits": inits, "shots": list(shots), "iterations": list(iterations), "seeds": list(seeds),
                   "pretrain_iters": cfg.pretrain_iters, "rows": {}}
    curves: dict[str, list] = {}
    for shot, iters in zip(shots, iterations):
        row: dict = {}
        for label, init in inits.items():
            is_all = shot == "all"
            run = dataclasses.replace(
                base, init=init, shots=None if is_all else int(shot), max_iters=iters,
                eval_every=max(1, iters // cfg.curve_points) if is_all else iters,
                checkpoint_every=iters, output=str(output / f"{label.lower()}_{shot}"))
            print(f"== {label} init, {shot} images per class, {iters} iterations, seeds {list(seeds)}", flush=True)
            summary = finetune(run)
            runs = _per_seed(summary)
            row[label] = {metric: _stats([r["final"][metric] for r in runs]) for metric in ("AP", "AP50", "VOC_AP50")}
            if is_all:
                curves[label] = runs
        row["DAP-CLS"] = {metric: _difference(row["DAP"][metric], row["CLS"][metric])
                          for metric in ("AP", "AP50", "VOC_AP50")}
        table["rows"][shot] = row
    table["wall_s"] = round(time.perf_counter() - started, 1)
    (output / "results.json").write_text(json.dumps(table, indent=2))
    (output / "results.md").write_text(_markdown(table))
    plot_metric_vs_shots({label: {shot: table["rows"][shot][label] for shot in shots} for label in inits},
                         output / "ap_vs_shots.png", title="Downstream sample: CLS vs DAP initialisation")
    if curves:
        lines = {f"{label} seed {r['seed']}": _evaluations(output, label, r) for label, runs in curves.items()
                 for r in runs}
        plot_learning_curves(lines, output / "learning_curves.png", title="Downstream sample, all training images")
    print(_markdown(table), flush=True)
    return table


def _per_seed(summary: dict) -> list[dict]:
    """Per-seed results of a :func:`finetune` return (a summary of several seeds, or one run's meta)."""
    if "runs" in summary:
        return summary["runs"]
    return [{"seed": summary["seed"], "final": summary["final"], "iterations": summary["iterations"]}]


def _evaluations(output: Path, label: str, run: dict) -> list[dict]:
    folder = output / f"{label.lower()}_all"
    path = folder / f"seed_{run['seed']}" / "metrics.jsonl"
    if not path.is_file():
        path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stats(values: list) -> dict:
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}


def _difference(dap: dict, cls: dict) -> dict:
    """DAP minus CLS: the difference of means, and of the seed-paired values (same k-shot draw)."""
    paired = [d - c for d, c in zip(dap["values"], cls["values"])]
    out = _stats(paired)
    out["mean"] = dap["mean"] - cls["mean"] if dap["mean"] is not None and cls["mean"] is not None else None
    return out


def _markdown(table: dict) -> str:
    def cell(stats: dict) -> str:
        return "n/a" if stats["mean"] is None else f"{stats['mean']:.1f} ± {stats['std']:.1f}"

    lines = [f"Seeds {table['seeds']}; DAP pre-trained {table['pretrain_iters']} iterations; "
             "mean ± sample std over seeds (DAP−CLS: over the seed-paired differences).", "",
             "| images per class | iterations | CLS AP | DAP AP | DAP−CLS AP | CLS AP50 | DAP AP50 | DAP−CLS AP50 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for shot, iters in zip(table["shots"], table["iterations"]):
        row = table["rows"][shot]
        lines.append(f"| {shot} | {iters} | {cell(row['CLS']['AP'])} | {cell(row['DAP']['AP'])} | "
                     f"{cell(row['DAP-CLS']['AP'])} | {cell(row['CLS']['AP50'])} | {cell(row['DAP']['AP50'])} | "
                     f"{cell(row['DAP-CLS']['AP50'])} |")
    return "\n".join(lines) + "\n"
