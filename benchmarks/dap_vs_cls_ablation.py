"""Why DAP does or does not beat CLS on the built-in samples: controlled variants of the DAP
initialisation, fine-tuned exactly as jobs/reproduce.py does (the downstream sample, K = 5 and
10 images per class, seeds 0 1 2, 40 and 50 iterations, the same settings for every variant).

    python benchmarks/dap_vs_cls_ablation.py --output ablation [--variants cls dap100 dap400 truth trunk]

Variants: cls (the Step 1 classifier's trunk); dap100 and dap400 (Step 3 on the sample's
pseudo boxes for 100 or 400 iterations); truth (Step 3 for 100 iterations on the sample's true
boxes instead: an oracle for pseudo-box quality); trunk (the dap100 detector's trunk alone,
FPN/RPN/heads random: what pre-training did to the trunk). Pre-training runs are cached as
jobs/reproduce.py caches them; a rerun finds finished fine-tunes. Prints a Markdown table of
AP and AP50 (mean +- std over seeds) and writes it to OUTPUT/table.md.
"""

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("cls", "dap100", "dap400", "truth", "trunk")
LABELS = {"cls": "CLS (the classifier's trunk)", "dap100": "DAP, 100 pre-training iterations on pseudo boxes",
          "dap400": "DAP, 400 pre-training iterations on pseudo boxes",
          "truth": "DAP, 100 pre-training iterations on true boxes (oracle)",
          "trunk": "the dap100 run's trunk alone (FPN/RPN/heads random)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="ablation")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()

    import torch

    from dap_ray.steps.embedded import (
        SAMPLE_FINETUNE,
        pretrain_defaults,
        sample_classifier,
        sample_downstream,
        sample_pretrained_detector,
        sample_true_boxes,
    )
    from dap_ray.steps.finetune import FinetuneConfig, finetune
    from dap_ray.steps.pretrain import PretrainConfig, pretrain

    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    downstream, classifier = sample_downstream(), sample_classifier() / "classifier.pt"
    base = FinetuneConfig(
        train=str(downstream / "coco" / "train.json"), test=str(downstream / "coco" / "test.json"),
        train_images=str(downstream / "images"), test_images=str(downstream / "images"), preset="voc",
        detector="faster_rcnn_fpn", backbone="resnet18", seeds=(0, 1, 2), **SAMPLE_FINETUNE)
    inits = {}
    for variant in args.variants:
        if variant == "cls":
            inits[variant] = f"cls:{classifier}"
        elif variant == "dap100":
            inits[variant] = f"dap:{sample_pretrained_detector()}"
        elif variant == "dap400":
            inits[variant] = f"dap:{sample_pretrained_detector(max_iters=400)}"
        elif variant == "truth":
            run = output / "pretrained_on_true_boxes"
            if not (run / "meta.json").is_file():
                cfg = pretrain_defaults(PretrainConfig(output=str(run)))
                pretrain(dataclasses.replace(cfg, boxes=str(sample_true_boxes())))
            inits[variant] = f"dap:{run}"
        else:
            state = torch.load(sample_pretrained_detector() / "detector_final.pt", weights_only=True)
            trunk = {k[len("backbone.body."):]: v for k, v in state.items() if k.startswith("backbone.body.")}
            trunk.update({k: v for k, v in torch.load(classifier, weights_only=True).items() if k.startswith("fc.")})
            torch.save(trunk, output / "dap100_trunk.pt")
            inits[variant] = f"cls:{output / 'dap100_trunk.pt'}"
    rows = []
    for variant, init in inits.items():
        cells = [LABELS[variant]]
        for k, iters in ((5, 40), (10, 50)):
            summary = finetune(dataclasses.replace(base, init=init, shots=k, max_iters=iters, checkpoint_every=iters,
                                                   output=str(output / f"{variant}_{k}")))
            for metric in ("AP", "AP50"):
                values = summary["metrics"][metric]["values"]
                cells.append(f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}")
        rows.append(cells)
    lines = ["| initialisation | 5-shot AP | 5-shot AP50 | 10-shot AP | 10-shot AP50 |",
             "| --- | ---: | ---: | ---: | ---: |"] + ["| " + " | ".join(r) + " |" for r in rows]
    (output / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    (output / "inits.json").write_text(json.dumps(inits, indent=2))


if __name__ == "__main__":
    main()
