"""What DAP pre-training buys on the built-in samples, measured: DAP minus CLS at a few K against
the pre-training's length and against the quality of the boxes it was pre-trained on.

It builds on the tuned loop (:func:`dap_ray.steps.reproduce.reproduce_tuned`, run first into
the same ``OUTPUT``): the searched box setting's mined boxes, the schedules searched for CLS
and for DAP, and the CLS fine-tunes, which every variant is paired with seed by seed. Each DAP
variant is a Step 3 run with the sample's settings, changing one thing:

- length: ``lengths`` iterations on the searched setting's boxes;
- boxes, at ``box_length`` iterations: the paper's setting's boxes (the embedded default's
  mining), the searched setting's, and the sample's true boxes (the ceiling).

Every variant is fine-tuned with the schedule searched for DAP (for the tuned loop's DAP run),
the same seeds and K as CLS, and evaluated on the test split once. Pre-trainings and
fine-tunes are cached by their settings; a rerun finds them. Writes ``OUTPUT/study/``:
``results.json``, ``results.md`` and ``gain.png`` (DAP - CLS AP against pre-training length,
and against the boxes' quality, one line per K).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dap_ray.steps.reproduce import _cell

__all__ = ["GainStudyConfig", "gain_study"]

BOX_SOURCES = ("paper", "searched", "true")


@dataclass(frozen=True)
class GainStudyConfig:
    """The study's variants. Defaults: K = 5 and 10, five seeds, 100/400/1,600 iterations."""

    output: str = field(default="reproduction", metadata={
        "help": "the tuned loop's output folder (jobs/reproduce.py --tuned); the study goes in OUTPUT/study"})
    shots: tuple[int, ...] = field(default=(5, 10), metadata={"help": "images per class (the tuned loop's K)"})
    seeds: tuple[int, ...] = field(default=(0, 1, 2, 3, 4), metadata={"help": "seeds, paired with CLS's"})
    lengths: tuple[int, ...] = field(default=(100, 400, 1600), metadata={
        "help": "pre-training iterations on the searched setting's boxes"})
    boxes: tuple[str, ...] = field(default=BOX_SOURCES, metadata={
        "help": "boxes to pre-train on at --box-length: paper (the paper's setting), searched, true (the ceiling)"})
    box_length: int = field(default=400, metadata={"help": "pre-training iterations of the box variants"})

    def __post_init__(self) -> None:
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"shots must be positive numbers, got {self.shots}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if min(self.lengths, default=1) < 1 or self.box_length < 1:
            raise ValueError("pre-training lengths must be at least 1")
        bad = [b for b in self.boxes if b not in BOX_SOURCES]
        if bad:
            raise ValueError(f"boxes must be some of {BOX_SOURCES}, got {bad}")
        if not self.lengths and not self.boxes:
            raise ValueError("give at least one of --lengths and --boxes")


def gain_study(cfg: GainStudyConfig) -> dict:
    """Pre-train each variant, fine-tune it and CLS per K and seed, write the table and figure."""
    from dap_ray.steps.embedded import (
        sample_downstream,
        sample_pretrain_settings,
        sample_pretrained_detector,
        sample_pseudo_boxes,
        sample_true_boxes,
    )
    from dap_ray.steps.finetune import finetune
    from dap_ray.steps.pretrain import PretrainConfig, pretrain
    from dap_ray.steps.reproduce import (
        _difference,
        _per_seed,
        _sample_finetune_base,
        _stats,
        kshot_schedule_file,
        tuned_run_folder,
    )

    started = time.perf_counter()
    output = Path(cfg.output).resolve()
    tuned = output / "tuned"
    loop = tuned / "results.json"
    if not loop.is_file():
        raise ValueError(f"no tuned loop in {output} ({loop} is missing): run jobs/reproduce.py --tuned --output "
                         f"{cfg.output} first")
    loop_table = json.loads(loop.read_text())
    missing = [k for k in cfg.shots if str(k) not in loop_table["rows"]]
    if missing:
        raise ValueError(f"the tuned loop in {output} has no schedule for K = {missing}; it has {loop_table['shots']}")
    unmatched = [k for k in cfg.shots if any(str(k) not in loop_table["schedules"][label].get("choices", {})
                                             for label in loop_table["inits"])]
    if unmatched:
        raise ValueError(f"the tuned loop in {output} chose its schedules for K = {unmatched} before it searched both "
                         "initialisations over the same ranges: run the same jobs/reproduce.py --tuned command again "
                         "(its searches are reused) first")
    folder = output / "study"
    folder.mkdir(parents=True, exist_ok=True)
    sources = {"paper": lambda: sample_pseudo_boxes() / "boxes", "searched": lambda: tuned / "mined" / "boxes",
               "true": sample_true_boxes}  # made only when a variant needs them
    variants = {f"searched-{n}": ("searched", n) for n in cfg.lengths}
    variants.update({f"{b}-{cfg.box_length}": (b, cfg.box_length) for b in cfg.boxes})
    runs = {}
    for name, (source, length) in variants.items():
        run = tuned / "pretrained" if (source, length) == ("searched", loop_table["pretrain_iters"]) else (
            folder / f"pretrained-{name}")
        if source == "paper":  # the embedded default's pre-training, shared with jobs/reproduce.py's preset grid
            run = sample_pretrained_detector(**({} if length == 100 else {"max_iters": length}))
        if not (run / "meta.json").is_file():
            print(f"== pre-training {name}: {length} iterations on {source} boxes", flush=True)
            pretrain(sample_pretrain_settings(PretrainConfig(output=str(run), max_iters=length,
                                                             boxes=str(sources[source]()))))
        runs[name] = run
    meta = json.loads((tuned / "pretrained" / "meta.json").read_text())
    base = _sample_finetune_base(sample_downstream(), meta, cfg.seeds)

    def fine_tune(init: str, table: str, k: int, where: Path) -> dict:
        run = dataclasses.replace(base, init=init, shots=k, max_iters=None, kshot_table=table, eval_every=10**9,
                                  checkpoint_every=10**9, output=str(where))
        per_seed = _per_seed(finetune(run))
        return {metric: _stats([r["final"][metric] for r in per_seed]) for metric in ("AP", "AP50")}

    cls_init = loop_table["inits"]["CLS"]
    rows: dict = {}
    for k in cfg.shots:
        print(f"== CLS, K = {k} (the tuned loop's runs, more seeds where asked)", flush=True)
        cls = fine_tune(cls_init, str(kshot_schedule_file(tuned, "CLS", k)), k, tuned_run_folder(tuned, "CLS", k))
        rows[str(k)] = {"CLS": cls}
        for name, run in runs.items():
            # A variant's runs follow the DAP schedule the loop chose; each schedule gets its own folder.
            loop_run = tuned_run_folder(tuned, "DAP", k)
            suffix = "_matched" if loop_run.name.endswith("_matched") else ""
            where = loop_run if run == tuned / "pretrained" else folder / f"{name}_{k}{suffix}"
            print(f"== DAP {name}, K = {k}", flush=True)
            dap = fine_tune(f"dap:{run}", str(kshot_schedule_file(tuned, "DAP", k)), k, where)
            rows[str(k)][name] = {**dap, "DAP-CLS": {m: _difference(dap[m], cls[m]) for m in ("AP", "AP50")}}
    used = {source for source, _ in variants.values()}
    quality = {source: _mined_quality(sources[source]().parent) for source in used - {"true"}}
    quality["true"] = {"corloc": 1.0}
    table = {"shots": list(cfg.shots), "seeds": list(cfg.seeds), "variants": {n: list(v) for n, v in variants.items()},
             "lengths": list(cfg.lengths), "boxes": list(cfg.boxes), "box_length": cfg.box_length,
             "box_quality": quality, "rows": rows, "wall_s": round(time.perf_counter() - started, 1)}
    (folder / "results.json").write_text(json.dumps(table, indent=2))
    text = _markdown(table)
    (folder / "results.md").write_text(text)
    _plot(table, folder / "gain.png")
    print(text, flush=True)
    return table


def _mined_quality(run: Path) -> dict:
    summary = run / "summary.json"
    return (json.loads(summary.read_text()).get("quality") or {}) if summary.is_file() else {}


def _markdown(table: dict) -> str:
    lines = [f"Seeds {table['seeds']}; DAP−CLS: mean ± sample std of the seed-paired differences (the same k-shot "
             "draw and order); every DAP variant fine-tuned with the schedule searched for DAP, CLS with its own.", "",
             "| pre-training | boxes' CorLoc | " + " | ".join(f"{k}-shot DAP AP | {k}-shot DAP−CLS AP | "
                                                         f"{k}-shot DAP−CLS AP50" for k in table["shots"]) + " |",
             "| --- | ---: | " + " | ".join("---: | ---: | ---:" for _ in table["shots"]) + " |"]
    for name, (source, length) in table["variants"].items():
        corloc = table["box_quality"].get(source, {}).get("corloc")
        cells = [f"{length} iterations on {source} boxes", "n/a" if corloc is None else f"{corloc:.3f}"]
        for k in table["shots"]:
            row = table["rows"][str(k)][name]
            cells += [_cell(row["AP"]), _cell(row["DAP-CLS"]["AP"], signed=True),
                      _cell(row["DAP-CLS"]["AP50"], signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| CLS (the classifier's trunk) | | " + " | ".join(
        f"{_cell(table['rows'][str(k)]['CLS']['AP'])} | | "
        for k in table["shots"]) + " |")
    return "\n".join(lines) + "\n"


def _plot(table: dict, path: Path) -> None:
    """DAP - CLS AP (seed-paired mean and std) against pre-training length on the searched boxes,
    and against the boxes (the paper's setting, the searched one, the truth), one line per K."""
    from dap_ray.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    figure, (by_length, by_boxes) = plt.subplots(1, 2, figsize=(10, 3.8))
    lengths = sorted((length, name) for name, (source, length) in table["variants"].items()
                     if name == f"searched-{length}")
    chosen = [(source, f"{source}-{table['box_length']}") for source in table["boxes"]]
    for k in table["shots"]:
        rows = table["rows"][str(k)]
        if lengths:
            gains = [rows[name]["DAP-CLS"]["AP"] for _, name in lengths]
            by_length.errorbar([n for n, _ in lengths], [g["mean"] for g in gains], yerr=[g["std"] for g in gains],
                               marker="o", capsize=4, label=f"{k}-shot")
        if chosen:
            gains = [rows[name]["DAP-CLS"]["AP"] for _, name in chosen]
            by_boxes.errorbar(range(len(chosen)), [g["mean"] for g in gains], yerr=[g["std"] for g in gains],
                              marker="o", capsize=4, label=f"{k}-shot")
            ticks = [f"{source}\nCorLoc {table['box_quality'].get(source, {}).get('corloc', float('nan')):.2f}"
                     for source, _ in chosen]
            by_boxes.set_xticks(range(len(chosen)), ticks)
    by_length.set_xscale("log")
    if lengths:  # ticks at the lengths tried: a log axis over 400-1,600 alone labels them 4x10^2
        by_length.set_xticks([n for n, _ in lengths], [f"{n:,}" for n, _ in lengths])
        by_length.minorticks_off()
    by_length.set_xlabel("pre-training iterations (searched boxes)")
    by_boxes.set_xlabel("boxes pre-trained on")
    for axis in (by_length, by_boxes):
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_ylabel("DAP − CLS AP (points)")
        axis.grid(alpha=0.3)
        axis.legend()
    save_figure(plt, figure, path, "What DAP pre-training buys on the downstream sample")
