"""Ray's own autoscaler (the ``fake_multinode`` provider) under a mining run of the GPU path:
the model pool grows past one actor as the autoscaler adds GPU nodes, and the nodes leave once idle."""

from __future__ import annotations

import threading
import time

import pytest

from tests.cluster.conftest import actor_nodes, fake_autoscaling_cluster, record_figure, wait_for

pytestmark = pytest.mark.cluster
IMAGES = 480
GPU_NODE = {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 150_000_000}, "max_workers": 3}


@pytest.fixture(scope="module")
def autoscaling():
    with fake_autoscaling_cluster({"gpu_node": GPU_NODE}, idle_timeout_minutes=0.1) as cluster:
        yield cluster


def test_the_model_pool_grows_as_the_autoscaler_adds_gpu_nodes(autoscaling, tmp_path):
    import torch

    from dap_ray.data.sample import SampleConfig, make_sample_dataset
    from dap_ray.steps.mine import MineConfig, mine
    from tests.factories import tiny_resnet

    sample = make_sample_dataset(tmp_path / "sample", SampleConfig(num_images=IMAGES, num_classes=3, image_size=32))
    torch.manual_seed(0)
    torch.save(tiny_resnet(num_classes=3).state_dict(), tmp_path / "weights.pt")
    assert autoscaling.gpu_nodes_alive() == 0  # the head alone: no CPUs, no GPUs

    pool_sizes: list[tuple[float, int]] = []  # (seconds since the start, alive actors)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            pool_sizes.append((time.monotonic() - started, len(actor_nodes("MapWorker"))))
            time.sleep(0.5)

    started = time.monotonic()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # The GPU path (encoded bytes to the actors, one GPU each) as a user runs it with GPUs; the
    # actors compute on CPU because these nodes' GPUs are fake.
    summary = mine(MineConfig(
        input=str(sample / "images"), class_map=str(sample / "classes.txt"), output=str(tmp_path / "mined"),
        classifier="tests.factories:slow_tiny_resnet", weights=str(tmp_path / "weights.pt"), scales=(32,),
        num_gpus_per_actor=1, device="cpu", batch_size=2, shard_size=8,
        actor_start_timeout_s=300))  # nodes that never start fail the test, not hang it
    wall = time.monotonic() - started
    stop.set()
    watcher.join()
    # Random weights on 32-pixel shapes: some CAMs are constant, recorded as errors, each image once.
    assert summary["images"] + summary["errors"] == IMAGES and summary["images"] > IMAGES // 2
    assert summary["config"]["decode"] == "auto" and summary["config"]["num_gpus_per_actor"] == 1
    largest = max(size for _, size in pool_sizes)
    assert largest > 1, f"the pool never grew past one actor: {pool_sizes}"
    first, grown = (next(t for t, size in pool_sizes if size >= n) for n in (1, 2))
    released = wait_for(lambda: autoscaling.gpu_nodes_alive() == 0, timeout=90, step=1.0)
    assert released, "the idle GPU nodes were not released"
    record_figure(f"autoscaling: {IMAGES} images on the GPU path from a head with no GPUs: the pool grew to {largest} "
                  f"actors on {largest} autoscaled GPU nodes (one actor up after {first:.0f} s, two after {grown:.0f} s), "
                  f"mined in {wall:.0f} s; the idle nodes left {time.monotonic() - started - wall:.0f} s after the run")


def test_a_gpu_pretraining_asks_for_its_nodes_and_starts_when_they_come(autoscaling, pseudo_run, tmp_path):
    from dap_ray.steps.pretrain import PretrainConfig, pretrain

    assert wait_for(lambda: autoscaling.gpu_nodes_alive() == 0, timeout=90, step=1.0), "GPU nodes left from before"
    boxes_dir, _, weights = pseudo_run
    started = time.monotonic()
    # Two workers of one GPU each, as with --use-gpu on real GPUs (gloo and CPU compute: the GPUs are fake).
    meta = pretrain(PretrainConfig(
        boxes=str(boxes_dir), output=str(tmp_path / "run"), backbone="tests.factories:tiny_resnet",
        backbone_weights=str(weights), num_workers=2, use_gpu=True, device="cpu", cpus_per_worker=1, loader_workers=0,
        batch_size=2, max_iters=4, checkpoint_every=2, warmup_iters=1, lr=0.01, min_sizes=(32,), max_size=64,
        roi_batch_size_per_image=16, log_every_s=1e9))
    wall = time.monotonic() - started
    assert meta["iterations"] == 4 and meta["history"][-1]["iteration"] == 4
    assert meta["config"]["use_gpu"] is True and meta["config"]["device"] == "cpu"
    # Releasing idle nodes is the mining test's to show; waiting for it again here would add 15-20 s.
    record_figure(f"autoscaling: a 2-worker --use-gpu pre-training from no GPU nodes: the autoscaler added 2, the "
                  f"run trained its 4 iterations, {wall:.0f} s in all")
