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

__all__ = ["ReproduceConfig", "kshot_schedule_file", "reproduce", "reproduce_tuned", "tuned_run_folder"]


@dataclass(frozen=True)
class ReproduceConfig:
    """The grid. Defaults: K = 5, 10, 20 and all, three seeds, under an hour on 2 CPU cores."""

    output: str = field(default="reproduction", metadata={"help": "folder for the table, figures and runs"})
    shots: tuple[str, ...] = field(default=("5", "10", "20", "all"), metadata={
        "help": "images per class to fine-tune on; 'all' is the full training split"})
    iterations: tuple[int, ...] = field(default=(40, 50, 60, 80), metadata={
        "help": "fine-tuning iterations for each --shots entry (the same for CLS and DAP)"})
    seeds: tuple[int, ...] | None = field(default=None, metadata={
        "help": "seeds (k-shot draw, order, fresh layers; default 0 1 2, with --tuned 0 1 2 3 4)"})
    pretrain_iters: int = field(default=400, metadata={
        "help": "DAP pre-training iterations on the sample's pseudo boxes (jobs/pretrain.py's default is 100, "
                "under one epoch of the sample: too short for DAP to beat CLS here, see the README)"})
    curve_points: int = field(default=3, metadata={"help": "evaluations along each full-split run, for the curves"})
    quick: bool = field(default=False, metadata={
        "help": "a first look: K = 5 and all, one seed (about a third of the time)"})
    tuned: bool = field(default=False, metadata={
        "help": "the tuned loop instead of the preset's schedule: the box setting searched on held-out true boxes, "
                "mining with it, a pre-training on those boxes, a k-shot schedule searched per K and per "
                "initialisation (CLS and DAP each get their own), then the test split once per seed; the numeric "
                "--shots only (under OUTPUT/tuned/)"})
    box_samples: int = field(default=48, metadata={"help": "--tuned: trials of the box search's first round"})
    kshot_samples: int = field(default=8, metadata={
        "help": "--tuned: trials of each k-shot search's first round (one search per K and initialisation)"})
    kshot_iterations_range: tuple[int, int] = field(default=(20, 160), metadata={
        "help": "--tuned: the k-shot searches' schedule lengths, from and to"})
    kshot_lr_range: tuple[float, float] = field(default=(0.001, 0.04), metadata={
        "help": "--tuned: the k-shot searches' learning rates, from and to"})

    def __post_init__(self) -> None:
        if not self.tuned and len(self.shots) != len(self.iterations):
            raise ValueError(f"give one --iterations entry per --shots entry: {self.shots} vs {self.iterations}")
        for shot in self.shots:
            if shot != "all" and not (shot.isdigit() and int(shot) >= 1):
                raise ValueError(f"--shots entries are positive numbers or 'all', got {shot!r}")
        if min(self.iterations) < 1 or self.pretrain_iters < 1 or self.curve_points < 1:
            raise ValueError("iterations, pretrain_iters and curve_points must be at least 1")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds must be distinct and at least one, got {self.seeds}")
        if self.tuned and not any(shot != "all" for shot in self.shots):
            raise ValueError("--tuned searches a schedule per K: give at least one number in --shots")
        if self.box_samples < 1 or self.kshot_samples < 1:
            raise ValueError("box_samples and kshot_samples must be at least 1")

    def run_seeds(self) -> tuple[int, ...]:
        """The seeds to run: those given, else 0-2 (0-4 for the tuned loop)."""
        if self.seeds is not None:
            return self.seeds
        return (0, 1, 2, 3, 4) if self.tuned else (0, 1, 2)

    def grid(self) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
        """(shots, iterations, seeds) to run: ``quick`` keeps the first and last shots and one seed."""
        seeds = self.run_seeds()
        if not self.quick:
            return self.shots, self.iterations, seeds
        keep = sorted({0, len(self.shots) - 1})
        return tuple(self.shots[i] for i in keep), tuple(self.iterations[i] for i in keep), seeds[:1]


def reproduce(cfg: ReproduceConfig) -> dict:
    """Run the grid (cached stages are reused) and write the table and figures; return the table."""
    import dataclasses

    from dap_ray.evaluation.plots import plot_learning_curves, plot_metric_vs_shots
    from dap_ray.steps.embedded import sample_classifier, sample_downstream, sample_pretrained_detector
    from dap_ray.steps.finetune import finetune

    started = time.perf_counter()
    output = Path(cfg.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    if cfg.tuned:
        return reproduce_tuned(cfg)
    shots, iterations, seeds = cfg.grid()
    classifier = sample_classifier() / "classifier.pt"
    pretrained = sample_pretrained_detector(**({} if cfg.pretrain_iters == 100 else {"max_iters": cfg.pretrain_iters}))
    downstream = sample_downstream()
    inits = {"CLS": f"cls:{classifier}", "DAP": f"dap:{pretrained}"}
    meta = json.loads((pretrained / "meta.json").read_text())
    base = _sample_finetune_base(downstream, meta, seeds)
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


def _sample_finetune_base(downstream: Path, meta: dict, seeds: tuple[int, ...]):
    """The downstream sample's fine-tuning settings shared by every run of a reproduction."""
    from dap_ray.steps.embedded import SAMPLE_FINETUNE
    from dap_ray.steps.finetune import FinetuneConfig

    return FinetuneConfig(
        train=str(downstream / "coco" / "train.json"), test=str(downstream / "coco" / "test.json"), format="coco",
        train_images=str(downstream / "images"), test_images=str(downstream / "images"), preset="voc",
        detector=meta["detector"], backbone=meta["backbone"], seeds=tuple(seeds), **SAMPLE_FINETUNE)


def reproduce_tuned(cfg: ReproduceConfig) -> dict:
    """The tuned loop on the built-in samples, each stage cached or resumed under ``OUTPUT/tuned``:

    1. the box setting searched (``tune_boxes``, Optuna) on half the sample's true boxes, reported
       on the other half (``boxes/``);
    2. the sample mined with it (``mined/``);
    3. a pre-training of ``pretrain_iters`` on those boxes, the sample's settings otherwise
       (``pretrained/``);
    4. for each K and each initialisation (CLS: the classifier's trunk; DAP: that pre-training) a
       k-shot schedule searched on training images each draw left out (``kshot_cls/kK/``,
       ``kshot_dap/kK/``), and searched again over the ranges covering both where the two
       searches ended over different ones (:func:`_kshot_schedules`; the choice:
       :func:`kshot_schedule_file`);
    5. K fine-tuned from each initialisation with its own schedule, every seed, evaluated on the
       test split once, at the end (:func:`tuned_run_folder`: ``cls_K/``, ``dap_K/``, or
       ``<init>_K_matched/`` when the schedule came from the second search).

    Stages 4 and 5 run K by K, and ``results.json`` and ``results.md`` (CLS, DAP and the
    seed-paired DAP-CLS per K, beside the preset's table when ``OUTPUT/results.json`` holds one)
    are written after each K: a long loop shows its first rows early, and a loop run for K = 5
    is reused whole by one run later for K = 5 and 10. Returns the table.
    """
    import dataclasses

    import yaml

    from dap_ray.steps.embedded import (
        mine_defaults,
        sample_classifier,
        sample_downstream,
        sample_pretrain_settings,
        tune_boxes_defaults,
        tune_finetune_defaults,
    )
    from dap_ray.steps.finetune import finetune
    from dap_ray.steps.mine import MineConfig, mine
    from dap_ray.steps.pretrain import PretrainConfig, pretrain
    from dap_ray.steps.tune import TuneBoxesConfig, TuneFinetuneConfig, tune_boxes, tune_finetune

    started = time.perf_counter()
    output = Path(cfg.output).resolve()
    folder = output / "tuned"
    folder.mkdir(parents=True, exist_ok=True)
    shots = [int(shot) for shot in cfg.shots if shot != "all"]
    seeds = cfg.run_seeds()
    if cfg.quick:
        shots, seeds = shots[:1], seeds[:1]
    print(f"== the tuned loop: K = {shots}, seeds {list(seeds)}, DAP pre-trained {cfg.pretrain_iters} iterations "
          f"on the searched boxes", flush=True)

    print("== 1/5: searching the box setting on held-out true boxes", flush=True)
    boxes = tune_boxes(tune_boxes_defaults(TuneBoxesConfig(output=str(folder / "boxes"), samples=cfg.box_samples)))
    best = yaml.safe_load((folder / "boxes" / "best.yaml").read_text())
    mined_run = folder / "mined"
    if (mined_run / "summary.json").is_file() and _settings_match(mined_run / "config.yaml", best):
        print(f"== 2/5: the sample mined with {best} already ({mined_run})", flush=True)
        mined = json.loads((mined_run / "summary.json").read_text())
    else:  # a run left with other settings is refused by mine(), naming them
        print(f"== 2/5: mining the sample with {best}", flush=True)
        mined = mine(mine_defaults(dataclasses.replace(MineConfig(output=str(mined_run)), **{
            **best, "thresholds": tuple(best["thresholds"])})))
    pretrained = folder / "pretrained"
    if not (pretrained / "meta.json").is_file():
        print(f"== 3/5: pre-training {cfg.pretrain_iters} iterations on those boxes", flush=True)
        # The sample's pre-training settings: only the boxes differ from the preset's DAP run.
        pretrain(sample_pretrain_settings(PretrainConfig(output=str(pretrained), max_iters=cfg.pretrain_iters,
                                                         boxes=str(folder / "mined" / "boxes"))))
    classifier = sample_classifier() / "classifier.pt"
    inits = {"CLS": f"cls:{classifier}", "DAP": f"dap:{pretrained}"}
    meta = json.loads((pretrained / "meta.json").read_text())
    base = _sample_finetune_base(sample_downstream(), meta, seeds)
    table: dict = {"inits": inits, "shots": [], "seeds": list(seeds), "pretrain_iters": cfg.pretrain_iters,
                   "box_setting": best, "box_search": {k: boxes.get(k) for k in ("report", "report_gain_AP50", "edges")},
                   "mined_quality": mined.get("quality"),
                   "schedules": {label: {"shots": {}, "rounds": {}, "choices": {}} for label in inits}, "rows": {}}

    def search(init: str, where: Path, k: int, iterations_range, lr_range, extend_rounds: int) -> dict:
        return tune_finetune(tune_finetune_defaults(TuneFinetuneConfig(
            output=str(where), init=init, shots=(k,), samples=cfg.kshot_samples, iterations_range=iterations_range,
            lr_range=lr_range, extend_rounds=extend_rounds, detector=meta["detector"], backbone=meta["backbone"])))

    for k in shots:
        choices = _kshot_schedules(cfg, folder, k, inits, search)
        for label, choice in choices.items():
            found = table["schedules"][label]
            found["shots"][str(k)] = {key: choice[key] for key in ("max_iters", "lr", "val_AP50")}
            found["rounds"][str(k)] = choice["own"]["rounds"]
            found["choices"][str(k)] = choice
        row: dict = {}
        for label, init in inits.items():
            chosen = table["schedules"][label]["shots"][str(k)]
            print(f"== 5/5: {label} init, {k} images per class, its schedule ({chosen['max_iters']} iterations at lr "
                  f"{chosen['lr']:.3g}), seeds {list(seeds)}, the test split once", flush=True)
            # max_iters from the table; the test split is evaluated once, at the end.
            run = dataclasses.replace(base, init=init, shots=k, max_iters=None,
                                      kshot_table=str(kshot_schedule_file(folder, label, k)),
                                      eval_every=10**9, checkpoint_every=10**9,
                                      output=str(tuned_run_folder(folder, label, k)))
            runs = _per_seed(finetune(run))
            row[label] = {metric: _stats([r["final"][metric] for r in runs]) for metric in ("AP", "AP50", "VOC_AP50")}
            row[label]["schedule"] = chosen
        row["DAP-CLS"] = {metric: _difference(row["DAP"][metric], row["CLS"][metric])
                          for metric in ("AP", "AP50", "VOC_AP50")}
        table["rows"][str(k)] = row
        table["shots"].append(str(k))
        table["wall_s"] = round(time.perf_counter() - started, 1)
        text = _write_tuned(folder, table, output / "results.json")
    print(text, flush=True)
    return table


def _kshot_schedules(cfg: ReproduceConfig, folder: Path, k: int, inits: dict[str, str], search) -> dict[str, dict]:
    """Stage 4 of the tuned loop at ``k`` images per class: a schedule for each initialisation in
    ``inits`` (label: init) that neither is handicapped by.

    Each initialisation's search starts from the loop's ranges and grows a range past an edge its
    best sits on (``kshot_<label>/kK/``). Left there, two searches can end over different ranges:
    one whose best sat on an edge searched schedules the other never tried, and their test
    figures would compare the searches, not the initialisations. So each initialisation whose
    final ranges fall short of those covering both (:func:`dap_ray.search.covering_ranges`,
    within the loop's hard limits: 4x the starting upper end of iterations) is searched again
    over them, one round, no growth (``kshot_<label>/kK_matched/``), and keeps whichever of its
    two searches validated better (the same validation images: the draw's leftovers). A best on
    the edge of the ranges it was searched over is noted, saying why it was not searched past.

    ``search(init, output, k, iterations_range, lr_range, extend_rounds)`` runs one search and
    returns :func:`dap_ray.steps.tune.tune_finetune`'s summary. Writes each choice to
    ``kshot_<label>/kK_choice.json`` (:func:`kshot_schedule_file`, :func:`tuned_run_folder` read
    it) and returns ``{label: choice}``: ``max_iters``, ``lr``, ``val_AP50``, ``search`` (the
    folder the schedule came from), ``own`` and ``matched`` (each search's ranges, trials and
    best; ``matched`` None when not needed), ``covering`` and ``edges`` (the chosen best's, each
    with a ``note``)."""
    from dap_ray.search import covering_ranges
    from dap_ray.steps.tune import TuneFinetuneConfig

    limits = TuneFinetuneConfig(iterations_range=cfg.kshot_iterations_range, lr_range=cfg.kshot_lr_range,
                                extend_rounds=1).search_ranges()
    searches: dict[str, dict] = {}
    for label, init in inits.items():
        print(f"== 4/5: searching the k-shot schedule from {label} for K = {k}", flush=True)
        summary = search(init, folder / f"kshot_{label.lower()}" / f"k{k}", k, cfg.kshot_iterations_range,
                         cfg.kshot_lr_range, 1)
        searches[label] = {"own": _search_record(summary, k, f"k{k}")}
    covering = covering_ranges([found["own"]["ranges"] for found in searches.values()], limits)
    choices = {}
    for label, init in inits.items():
        own, matched = searches[label]["own"], None
        if own["ranges"] != covering:
            print(f"== 4/5: {label}'s search for K = {k} ended over {_ranges_text(own['ranges'])}, short of "
                  f"{_ranges_text(covering)} (the ranges covering every initialisation's): searching {label} "
                  "again over those", flush=True)
            matched = _search_record(search(init, folder / f"kshot_{label.lower()}" / f"k{k}_matched", k,
                                            tuple(covering["max_iters"]), tuple(covering["lr"]), 0), k, f"k{k}_matched")
        chosen = own if matched is None or own["best"]["val_AP50"] >= matched["best"]["val_AP50"] else matched
        edges = [{**hit, "note": _edge_note(hit, limits, chosen is matched)} for hit in chosen["edges"]]
        choice = {**{key: chosen["best"][key] for key in ("max_iters", "lr", "val_AP50")}, "search": chosen["search"],
                  "own": own, "matched": matched, "covering": covering, "edges": edges}
        if matched is not None:
            other = own if chosen is matched else matched
            print(f"== 4/5: {label}, K = {k}: kept the {'second' if chosen is matched else 'first'} search's schedule "
                  f"({chosen['best']['max_iters']} iterations at lr {chosen['best']['lr']:.3g}, validation AP50 "
                  f"{chosen['best']['val_AP50']:.2f} against {other['best']['val_AP50']:.2f})", flush=True)
        for edge in edges:
            print(f"== 4/5: {label}, K = {k}: {edge['note']}", flush=True)
        choices[label] = choice
    # Written together once every search at K is done: a failed second search leaves no choice
    # of one initialisation beside a stale one of the other.
    for label, choice in choices.items():
        path = folder / f"kshot_{label.lower()}" / f"k{k}_choice.json"
        path.with_suffix(".tmp").write_text(json.dumps(choice, indent=2))
        path.with_suffix(".tmp").replace(path)
    return choices


def _search_record(summary: dict, k: int, name: str) -> dict:
    """What the loop keeps of one k-shot search (a :func:`dap_ray.steps.tune.tune_finetune` summary)
    at ``k``: its folder's ``name``, final ranges, trials, rounds, best and the edges that best sits on."""
    rounds = summary["rounds"][k]
    return {"search": name, "ranges": rounds[-1]["ranges"], "trials": sum(r["trials"] for r in rounds),
            "rounds": rounds, "best": dict(summary["shots"][k]), "edges": rounds[-1]["edges"]}


def _edge_note(hit: dict, limits: list, matched: bool) -> str:
    """Why a chosen schedule's best on an edge of its ranges was not searched past."""
    limit = next(r for r in limits if r.name == hit["name"])
    end = hit["range"][0] if hit["side"] == "low" else hit["range"][1]
    at_limit = end == (limit.limit_low if hit["side"] == "low" else limit.limit_high)
    where = (f"the best {hit['name']} {hit['value']:g} sits on the {hit['side']} edge of "
             f"[{hit['range'][0]:g}, {hit['range'][1]:g}]")
    if at_limit:
        return f"{where}, the loop's limit: not searched past it (a better schedule may lie beyond)"
    if matched:
        return f"{where}, the ranges covering both initialisations' searches: not grown, so both were searched alike"
    return f"{where}, the second round's range: the loop's searches grow a range once, so not searched past it"


def _ranges_text(ranges: dict) -> str:
    return ", ".join(f"{name} [{low:g}, {high:g}]" for name, (low, high) in ranges.items())


def _choice(tuned: Path, label: str, k: int) -> dict | None:
    path = tuned / f"kshot_{label.lower()}" / f"k{k}_choice.json"
    return json.loads(path.read_text()) if path.is_file() else None


def kshot_schedule_file(tuned: Path, label: str, k: int) -> Path:
    """The k-shot schedule (``jobs/finetune.py --kshot-table``) the tuned loop in folder ``tuned``
    chose for initialisation ``label`` (CLS or DAP) at ``k`` images per class: its own search's
    (``kshot_<label>/kK/``) or, when it was searched again over the ranges covering both
    initialisations' and validated better there, that one's (``kshot_<label>/kK_matched/``)."""
    choice = _choice(tuned, label, k)
    return tuned / f"kshot_{label.lower()}" / (choice["search"] if choice else f"k{k}") / "kshot_preset.yaml"


def tuned_run_folder(tuned: Path, label: str, k: int) -> Path:
    """Where the tuned loop fine-tunes ``label`` at ``k`` with the schedule :func:`kshot_schedule_file`
    names: ``<label>_K``, or ``<label>_K_matched`` for the second search's (a run folder refuses
    other settings, so each schedule gets its own)."""
    choice = _choice(tuned, label, k)
    matched = choice is not None and choice["search"].endswith("_matched")
    return tuned / f"{label.lower()}_{k}{'_matched' if matched else ''}"


def _write_tuned(folder: Path, table: dict, preset: Path) -> str:
    """The tuned loop's ``results.json``, ``results.md`` and ``ap_vs_shots.png`` in ``folder`` for
    the rows done so far; returns the Markdown."""
    from dap_ray.evaluation.plots import plot_metric_vs_shots

    text = _markdown_tuned(table, json.loads(preset.read_text()) if preset.is_file() else None)
    (folder / "results.json").write_text(json.dumps(table, indent=2))
    (folder / "results.md").write_text(text)
    plot_metric_vs_shots({label: {shot: table["rows"][shot][label] for shot in table["shots"]}
                          for label in table["inits"]},
                         folder / "ap_vs_shots.png", title="Downstream sample, tuned: CLS vs DAP initialisation")
    return text


def _settings_match(config_file: Path, settings: dict) -> bool:
    """Whether the run whose resolved config is ``config_file`` has ``settings``."""
    import yaml

    saved = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    return isinstance(saved, dict) and all(saved.get(k) == v for k, v in settings.items())


def _markdown_tuned(table: dict, preset: dict | None) -> str:
    search = table["box_search"]
    lines = [f"Seeds {table['seeds']}; DAP pre-trained {table['pretrain_iters']} iterations on boxes mined with the "
             f"searched setting {table['box_setting']}; mean ± sample std over seeds (DAP−CLS: over the seed-paired "
             "differences); each initialisation fine-tuned with the schedule searched for it, the test split "
             "evaluated once.", ""]
    if search.get("report"):
        held = search["report"]
        lines += [f"The box setting on the true boxes held out of its search: AP50 {held['best']['AP50']:.2f} against "
                  f"the paper's {held['default']['AP50']:.2f}.", ""]
    lines += ["| schedule | images per class | CLS schedule | DAP schedule | CLS AP | DAP AP | DAP−CLS AP | CLS AP50 | "
              "DAP AP50 | DAP−CLS AP50 |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for shot in table["shots"]:
        row = table["rows"][shot]
        cls_s, dap_s = row["CLS"]["schedule"], row["DAP"]["schedule"]
        lines.append(f"| tuned | {shot} | {cls_s['max_iters']} it, lr {cls_s['lr']:.3g} | {dap_s['max_iters']} it, "
                     f"lr {dap_s['lr']:.3g} | {_cell(row['CLS']['AP'])} | {_cell(row['DAP']['AP'])} | "
                     f"{_cell(row['DAP-CLS']['AP'], signed=True)} | {_cell(row['CLS']['AP50'])} | "
                     f"{_cell(row['DAP']['AP50'])} | {_cell(row['DAP-CLS']['AP50'], signed=True)} |")
    if preset:
        for shot, iters in zip(preset["shots"], preset["iterations"]):
            row = preset["rows"][shot]
            schedule = f"{iters} it, the preset's lr"
            lines.append(f"| preset (seeds {preset['seeds']}, DAP on the paper's boxes) | {shot} | {schedule} | "
                         f"{schedule} | {_cell(row['CLS']['AP'])} | {_cell(row['DAP']['AP'])} | "
                         f"{_cell(row['DAP-CLS']['AP'], signed=True)} | {_cell(row['CLS']['AP50'])} | "
                         f"{_cell(row['DAP']['AP50'])} | {_cell(row['DAP-CLS']['AP50'], signed=True)} |")
    return "\n".join(lines + _schedule_lines(table)) + "\n"


def _cell(stats: dict, signed: bool = False) -> str:
    """A table cell for :func:`_stats`: mean ± sample std, one decimal; ``signed`` for differences."""
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:{'+' if signed else ''}.1f} ± {stats['std']:.1f}"


def _schedule_lines(table: dict) -> list[str]:
    """How each tuned schedule was searched: which search it came from, over which ranges and how
    many trials, and any edge its best sits on (tables written before the second search: none)."""
    lines = []
    for shot in table["shots"]:
        for label in table["inits"]:
            choice = table["schedules"][label].get("choices", {}).get(shot)
            if choice is None:
                continue
            own, matched = choice["own"], choice["matched"]
            text = f"- K = {shot}, {label}: searched over {_search_text(own)}"
            if matched is not None:
                kept = "the second" if choice["search"] == matched["search"] else "the first"
                text += (f", then again over the ranges covering both initialisations', {_search_text(matched)}; "
                         f"{kept} kept")
            lines.append(text + ".")
            lines += [f"  - {edge['note']}." for edge in choice["edges"]]
    return ["", "How each schedule was searched (validation: training images the k-shot draw left out):", "",
            *lines] if lines else []


def _search_text(search: dict) -> str:
    """A :func:`_search_record` in words: its ranges, trials and best."""
    best = search["best"]
    trials = f"{search['trials']} trial{'' if search['trials'] == 1 else 's'}"
    return (f"{_ranges_text(search['ranges'])} ({trials}; best {best['max_iters']} it at "
            f"lr {best['lr']:.3g}, validation AP50 {best['val_AP50']:.1f})")


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
    lines = [f"Seeds {table['seeds']}; DAP pre-trained {table['pretrain_iters']} iterations; "
             "mean ± sample std over seeds (DAP−CLS: over the seed-paired differences).", "",
             "| images per class | iterations | CLS AP | DAP AP | DAP−CLS AP | CLS AP50 | DAP AP50 | DAP−CLS AP50 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for shot, iters in zip(table["shots"], table["iterations"]):
        row = table["rows"][shot]
        lines.append(f"| {shot} | {iters} | {_cell(row['CLS']['AP'])} | {_cell(row['DAP']['AP'])} | "
                     f"{_cell(row['DAP-CLS']['AP'], signed=True)} | {_cell(row['CLS']['AP50'])} | "
                     f"{_cell(row['DAP']['AP50'])} | {_cell(row['DAP-CLS']['AP50'], signed=True)} |")
    return "\n".join(lines) + "\n"
