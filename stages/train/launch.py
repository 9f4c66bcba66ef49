"""Run `engine.train_loop` on N data-parallel workers inside Ray Train, or in this process.

    launch(policy, cfg, run_dir)                  # Ray Train TorchTrainer, cfg.workers workers (Ray must be up)
    launch(policy, cfg, run_dir, use_ray=False)   # one process, world size 1, no Ray

A rerun with the same `run_dir` resumes from its last complete checkpoint. The caller owns the Ray
connection (infra starts or connects it); `python -m stages.train.launch --toy` starts a local,
loopback-only Ray for its own run and shuts it down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from data_contracts.config import TrainConfig
from stages.train.engine import MetricsCallback, Policy, init_single_process, train_loop


WORKERS_DIR = "workers"
"""Under the run folder: `rank-<r>.json`, where rank r of the last Ray launch ran (node id, IP, host, pid)."""


def _record_placement(run_dir: str | Path) -> None:
    """Write where this Ray Train worker runs to `run_dir/workers/rank-<r>.json` (each rank its own file:
    no collective, so it works before the process group is used; the run folder is shared by all ranks)."""
    import socket

    import ray
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    runtime = ray.get_runtime_context()
    info = {"rank": rank, "node_id": runtime.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(), "pid": os.getpid()}
    folder = Path(run_dir) / WORKERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, folder / f"rank-{rank}.json")


def _placement(run_dir: Path, world: int) -> list[dict[str, Any]]:
    """The placement records the ranks of this launch wrote, by rank."""
    found = []
    for rank in range(world):
        path = run_dir / WORKERS_DIR / f"rank-{rank}.json"
        if path.is_file():
            found.append(json.loads(path.read_text()))
    return found


def _loopback_torch_config(backend: str) -> Any:
    """Ray Train's TorchConfig, except that every worker first makes rank 0's rendezvous store listen only on
    MASTER_ADDR (Ray sets it to rank 0's node address; torch alone would listen on every interface).

    The patch must be in place before Ray's backend calls init_process_group, which happens before the train
    function runs, so it goes in through the backend's on_start (`_TorchBackend` is Ray's private class)."""
    from ray.train.torch.config import TorchConfig, _TorchBackend

    from stages.train.rendezvous import bind_store_to_master_addr

    class LoopbackStoreBackend(_TorchBackend):
        def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
            worker_group.execute(bind_store_to_master_addr)
            super().on_start(worker_group, backend_config)

    class LoopbackStoreTorchConfig(TorchConfig):
        @property
        def backend_cls(self) -> type:
            return LoopbackStoreBackend

    return LoopbackStoreTorchConfig(backend=backend)


def _worker(config: dict[str, Any]) -> None:
    _record_placement(config["run_dir"])
    train_loop(config["policy"], config["cfg"], config["run_dir"], on_metrics=config["on_metrics"],
               use_gpu=config["use_gpu"])


def launch(
    policy: Policy,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    on_metrics: MetricsCallback | None = None,
    use_ray: bool = True,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
) -> dict[str, Any]:
    """Train; returns rank 0's result ({"step", "resumed_from", "metrics", "final_model", "timings"}); with Ray
    also "workers": per rank, the node it ran on ({"rank", "node_id", "node_ip", "hostname", "pid"}), which
    is added to the run's result.json as well.

    With Ray, `on_metrics` runs inside rank 0's worker process (it is pickled there), and a worker failure
    raises `ray.train.TrainingFailedError` once `cfg.max_failures` restarts are spent. The workers are
    placed with `cfg.placement_strategy` (SPREAD: one per node where the cluster allows).
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not use_ray:
        cleanup = init_single_process()
        try:
            return train_loop(policy, cfg, run_dir, on_metrics=on_metrics, use_gpu=use_gpu)
        finally:
            cleanup()

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        raise RuntimeError("Ray is not connected: start or connect it first (infra), or pass use_ray=False")
    if use_gpu:  # Ray Train with use_gpu=True on a cluster short of GPUs waits forever: fail now instead
        have = ray.cluster_resources().get("GPU", 0)
        if have < cfg.workers:
            raise RuntimeError(f"train asks for {cfg.workers} GPU workers but the Ray cluster has {have:g} GPUs")
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"policy": policy, "cfg": cfg, "run_dir": str(run_dir), "on_metrics": on_metrics,
                           "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=cfg.placement_strategy),
        torch_config=_loopback_torch_config("nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                             storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    shutil.rmtree(run_dir / WORKERS_DIR, ignore_errors=True)  # only this launch's ranks
    trainer.fit()
    result = json.loads((run_dir / "result.json").read_text())
    result["workers"] = _placement(run_dir, cfg.workers)
    tmp = run_dir / ".result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, run_dir / "result.json")
    return result


def toy_config(**over: Any) -> TrainConfig:
    """The toy run's settings: a high learning rate (the toy model is tiny) and real ZeRO-3 partitioning
    (DeepSpeed would otherwise keep every parameter of a model this small unpartitioned)."""
    base: dict[str, Any] = dict(
        steps=30, checkpoint_every=10, learning_rate=1e-2, group_size=8, questions_per_step=2, workers=2,
        zero_stage=2, deepspeed_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
    )
    return TrainConfig(**{**base, **over})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", required=True, help="train the toy policy (the only mode here yet)")
    p.add_argument("--run-dir", required=True, help="checkpoints, metrics.jsonl and result.json go here")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ray", action="store_true", help="one process, no Ray (world size 1)")
    a = p.parse_args(argv)

    from stages.train.toy import ToyPolicy

    cfg = toy_config(steps=a.steps, workers=1 if a.no_ray else a.workers, zero_stage=a.zero_stage,
                     checkpoint_every=a.checkpoint_every, seed=a.seed)

    def show(step: int, m: dict[str, float]) -> None:
        print(f"step {step:4d}  loss {m['loss']:+.4f}  reward {m['reward']:.3f}  acc {m['reward/accuracy/mean']:.3f}"
              f"  format {m['reward/format/mean']:.3f}  eta {m['eta/mean']:.3f}  kl {m['kl']:.4f}"
              f"  {m['step_time'] * 1000:.0f} ms", flush=True)

    t0 = time.perf_counter()
    if a.no_ray:
        result = launch(ToyPolicy(cfg), cfg, a.run_dir, on_metrics=show, use_ray=False)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only local Ray
        import ray

        address = os.environ.get("MARC_RAY_ADDRESS")
        ray.init(address=address, **({} if address else {"num_cpus": a.workers, "include_dashboard": False}))
        try:
            print(f"ray up in {time.perf_counter() - t0:.1f} s", flush=True)
            result = launch(ToyPolicy(cfg), cfg, a.run_dir, on_metrics=show)
        finally:
            ray.shutdown()
    print(json.dumps({"wall_s": round(time.perf_counter() - t0, 1), **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
