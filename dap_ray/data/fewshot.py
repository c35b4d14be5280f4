"""The DAP paper's low-data protocol: K training *images* per class, all classes. No Ray."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dap_ray.data.downstream import DetectionSet

__all__ = ["KShotSample", "sample_k_shot"]


class KShotSample(NamedTuple):
    """A k-shot draw (unpacks as ``indices, report``).

    ``indices``: (m,) int64 image indices into the set, ascending, no repeats.
    ``report``: ``{"k", "seed", "class_order": [names, in the order drawn], "per_class":
    {name: {"eligible": images showing the class, "drawn": images drawn for it,
    "in_sample": chosen images showing it}}, "short": {name: images drawn, for each class
    that got fewer than k}}``.
    """

    indices: np.ndarray
    report: dict


def sample_k_shot(dataset: DetectionSet, k: int, seed: int) -> KShotSample:
    """Draw ``k`` images per class from ``dataset`` (the DAP paper's few-shot protocol).

    An image *shows* class c if it has a box of class c that is neither difficult nor crowd.
    Classes are visited rarest first (fewest images showing them; ties by label), and each
    draws ``k`` images at random among those showing it that no earlier class drew: without
    replacement across classes, so the sample has k x (number of classes) images (5-shot
    VOC: 100, COCO: 400, the paper's counts). Rarest first, because a common class's images
    often show rare classes too and would otherwise use up the few a rare class has. Every
    box of a chosen image is kept (including other classes' and difficult ones).

    A class that cannot get ``k`` (it shows in fewer than ``k`` images, or earlier classes
    drew some of them) takes all that are left and is listed in ``report["short"]``; the
    sample then still holds every image showing it, so each class shows in at least
    ``min(k, images showing it)`` chosen images.

    Deterministic for (``k``, ``seed``) and the set; different seeds give different draws.
    Draws for different k are not nested (5-shot is not a subset of 10-shot); the paper
    gives no seeds or sampling code.

    Unlike TFA (Wang et al. 2020), which samples K *instances* of each novel class and keeps
    only that class's boxes in the chosen images (with nested subsets across K and fixed
    seed files), this samples K *images* per class over all classes and keeps all their
    boxes, so a class may have more than K instances in the sample.

    Raises ``ValueError`` for ``k`` < 1 or not an integer.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer of at least 1 (images per class), got {k!r}")
    k = int(k)
    num_classes = len(dataset.classes)
    showing: list[list[int]] = [[] for _ in range(num_classes)]
    for i in range(len(dataset)):
        usable = ~dataset.difficult[i] & ~dataset.iscrowd[i]
        for c in np.unique(dataset.labels[i][usable]):
            showing[int(c)].append(i)
    rng = np.random.default_rng(seed)
    order = sorted(range(num_classes), key=lambda c: (len(showing[c]), c))
    taken = np.zeros(len(dataset), bool)
    drawn: dict[int, int] = {}
    for c in order:
        candidates = np.asarray([i for i in showing[c] if not taken[i]], np.int64)
        picked = candidates[rng.permutation(len(candidates))[:k]]
        taken[picked] = True
        drawn[c] = len(picked)
    indices = np.flatnonzero(taken).astype(np.int64)
    per_class = {
        dataset.classes[c]: {"eligible": len(showing[c]), "drawn": drawn[c],
                             "in_sample": int(taken[showing[c]].sum()) if showing[c] else 0}
        for c in range(num_classes)
    }
    report = {
        "k": k, "seed": seed, "class_order": [dataset.classes[c] for c in order], "per_class": per_class,
        "short": {dataset.classes[c]: drawn[c] for c in order if drawn[c] < k},
    }
    return KShotSample(indices, report)
