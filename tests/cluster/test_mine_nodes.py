"""Step 2 on several nodes: a node lost mid-run costs nothing (every image once, the same boxes)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dap_ray.data.export import read_boxes
from dap_ray.steps.mine import MineConfig, mine
from tests.cluster.conftest import LossSequence, record_figure, top_up

pytestmark = pytest.mark.cluster


IMAGES = 80


@pytest.fixture(scope="module")
def mining_input(tmp_path_factory):
    """80 sample images (3 classes, 48 px) and random tiny-ResNet weights."""
    import torch

    from dap_ray.data.sample import SampleConfig, make_sample_dataset
    from tests.factories import tiny_resnet

    root = tmp_path_factory.mktemp("mining_input")
    sample = make_sample_dataset(root / "sample", SampleConfig(num_images=IMAGES, num_classes=3, image_size=48, seed=5))
    torch.manual_seed(0)
    torch.save(tiny_resnet(num_classes=3).state_dict(), root / "weights.pt")
    return sample, root / "weights.pt"


def config(mining_input, output, **overrides):
    sample, weights = mining_input
    # One image per forward pass: each image's boxes then come out bit for bit, whichever actor mines it.
    values = dict(input=str(sample / "images"), class_map=str(sample / "classes.txt"), output=str(output),
                  classifier="tests.factories:tiny_resnet", weights=str(weights), num_classes=3, scales=(32, 64),
                  batch_size=1, shard_size=4, rows_per_file=2)
    return MineConfig(**{**values, **overrides})


def written_ids(output: Path) -> list[str]:
    files = sorted((output / "boxes").glob("*.parquet")) + sorted((output / "errors").glob("*.parquet"))
    return [i for f in files for i in pq.read_table(f, columns=["image_id"]).column(0).to_pylist()]


@pytest.fixture(scope="module")
def undisturbed(node_cluster, mining_input, tmp_path_factory):
    output = tmp_path_factory.mktemp("mine_undisturbed")
    started = time.monotonic()
    summary = mine(config(mining_input, output))
    return {r["image_id"]: r for r in read_boxes(output / "boxes")}, summary, time.monotonic() - started


def test_mining_survives_a_preemption_and_a_node_loss(node_cluster, mining_input, undisturbed, tmp_path):
    expected, expected_summary, _ = undisturbed
    top_up(node_cluster)
    output = tmp_path / "mined"

    def progressed(since: float) -> bool:  # an output file written since the last loss
        return any(p.stat().st_mtime > since for p in (output / "boxes").glob("*.parquet"))

    losses = LossSequence(node_cluster, "MapWorker", progressed)
    losses.start()
    started = time.monotonic()
    summary = mine(config(mining_input, output, classifier="tests.factories:slow_tiny_resnet"))
    back_after = losses.check()
    ids = written_ids(output)
    assert len(ids) == len(set(ids)) == IMAGES  # every image once, boxes or error
    assert (summary["images"], summary["errors"]) == (expected_summary["images"], expected_summary["errors"])
    got = {r["image_id"]: r for r in read_boxes(output / "boxes")}
    assert got.keys() == expected.keys()
    for image_id, row in expected.items():
        assert got[image_id]["boxes"].tolist() == row["boxes"].tolist(), image_id
    for how, seconds in zip(("preempted", "killed"), back_after, strict=False):
        record_figure(f"Step 2 (mining), node {how}: a model actor up again on another node {seconds:.1f} s after "
                      f"the loss; {len(ids)} images written once each, boxes identical to an undisturbed run's")
    record_figure(f"Step 2 (mining): the run with both losses took {time.monotonic() - started:.1f} s, the undisturbed "
                  f"one {undisturbed[2]:.1f} s")
