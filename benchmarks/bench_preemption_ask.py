"""What one ask for a preemption notice costs a Ray Train worker: ``ray.train.get_preemption_info()``,
which Steps 3 and 4 call ``dap_ray.steps.detector_loop.NOTICE_ASKS_PER_CHECKPOINT`` times per
checkpoint interval (a barrier of all ranks through Ray Train's synchronisation actor).

    python benchmarks/bench_preemption_ask.py [--asks 500] [--workers 1 2]

Starts a local Ray with as many CPUs as the largest worker count, runs a TorchTrainer per
worker count whose workers ask ``--asks`` times, and prints each rank's mean milliseconds per ask.
On a cluster the ask is also a round trip to the controller's node.
"""

import argparse
import os
import tempfile
import time


def _asks(config: dict) -> None:
    import ray.train

    ray.train.get_preemption_info()  # the first ask sets the synchronisation actor up
    started = time.perf_counter()
    for _ in range(config["asks"]):
        ray.train.get_preemption_info()
    per_ask_ms = (time.perf_counter() - started) / config["asks"] * 1000
    print(f"workers={config['workers']} rank={ray.train.get_context().get_world_rank()} "
          f"ms_per_ask={per_ask_ms:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asks", type=int, default=500, help="asks per worker")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run")
    args = parser.parse_args()
    if args.asks < 1 or min(args.workers) < 1:
        parser.error("--asks and --workers must be positive")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=max(args.workers), include_dashboard=False)
    with tempfile.TemporaryDirectory() as storage:
        for workers in args.workers:
            TorchTrainer(_asks, train_loop_config={"asks": args.asks, "workers": workers},
                         scaling_config=ScalingConfig(num_workers=workers),
                         run_config=RunConfig(storage_path=storage, name=f"asks_{workers}",
                                              worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}),
                         ).fit()
    ray.shutdown()


if __name__ == "__main__":
    main()
