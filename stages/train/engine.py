"""The C-GRPO training loop on a DeepSpeed ZeRO engine, generic over a `Policy`.

`train_loop` runs on every data-parallel rank with `torch.distributed` already initialised (Ray
Train's `TorchTrainer` does it with gloo on CPU; `init_single_process` does it for one process).
Per step: `batch = policy.make_batch(...)` under no_grad (sampling, rewards, old/ref log-probs), then
`updates_per_batch` times `loss = policy.step_loss(...)`, `engine.backward(loss)`, `engine.step()`.

Determinism: before each step every RNG (python, numpy, torch) is reseeded from (seed, step, rank)
and the policy gets a `torch.Generator` seeded the same way, so step s computes the same thing
whether the run got there uninterrupted or resumed from a checkpoint; data order comes from
`shard_indices(seed, step, rank)`.

Checkpoint layout (all ranks write into one shared folder, `run_dir/checkpoints`):

    run_dir/
      checkpoints/
        step_000004/                 complete checkpoint of 4 finished steps (atomic: renamed from .tmp-*)
          deepspeed/                 engine.save_checkpoint(tag="deepspeed"): mp_rank_00_model_states.pt,
                                     zero_pp_rank_{r}_mp_rank_00_optim_states.pt (+ ZeRO-3 model shards)
          latest, zero_to_fp32.py    DeepSpeed's tag pointer ("deepspeed") and its offline consolidation script
          rng_rank{r}.json           python / numpy / torch RNG states of rank r
          trainer_state.json         {"step", "world_size", "zero_stage", "seed", "config", "time"}; written last
        .tmp-step_000006/            a save in progress (or killed mid-save): ignored, removed on resume
      metrics.jsonl                  one JSON line per finished step (rank 0); cut back to the resumed step
      result.json                    final step, resume point, last metrics, final model path (rank 0)
      final/model.pt                 full weights (ZeRO-3: consolidated) unless the policy saves its own
      ray/                           Ray Train's run storage (launch with Ray only)

Resume: the newest `step_*` folder that has `trainer_state.json` is loaded on every rank (same world
size required), and training continues at the next step.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from data_contracts.config import TrainConfig
from stages.train.rendezvous import bind_store_to_master_addr

MetricsCallback = Callable[[int, dict[str, float]], None]
CKPT_TAG = "deepspeed"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class StepContext:
    """What a policy may depend on in one step. `generator` is its only source of randomness."""

    step: int  # 1-based global step being computed
    rank: int
    world_size: int
    seed: int
    generator: torch.Generator  # seeded from (seed, step, rank)
    updates_per_batch: int = 1  # mu: step_loss runs this many times on one batch
    update: int = 0  # which of those updates is running


@runtime_checkable
class Policy(Protocol):
    """What the loop needs from a model. Must be picklable (it travels to Ray workers).

    Under ZeRO-3 every rank must call the model the same number of times per step (each call gathers
    parameters collectively): generate to a fixed length, or with `synced_gpus=True` in HF generate.
    """

    def build_model(self) -> nn.Module:
        """The trainable policy, with identical weights on every rank (seeded init or a checkpoint)."""
        ...

    def make_batch(self, model: nn.Module, ref_model: nn.Module | None, ctx: StepContext) -> Any:
        """Under no_grad: this rank's questions for ctx.step, G samples each, rewards, ref (and old) log-probs."""
        ...

    def step_loss(self, model: nn.Module, batch: Any, ctx: StepContext) -> tuple[Tensor, dict[str, float]]:
        """With grad: the C-GRPO loss of the batch and scalar metrics (the same keys on every rank; NaN = none)."""
        ...


# Optional policy hooks (looked up with getattr):
#   build_reference(model) -> nn.Module | None   default: a frozen deep copy of the initial model (None if beta == 0)
#   save_final(state_dict, out_dir: Path) -> Path  default: torch.save(state_dict, out_dir / "model.pt")


# ------------------------------------------------------------------------------ determinism


def step_seed(seed: int, step: int, rank: int) -> int:
    digest = hashlib.sha256(f"marc-train:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(s: int) -> torch.Generator:
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def shard_indices(num_items: int, per_rank: int, *, seed: int, step: int, rank: int, world_size: int) -> list[int]:
    """Items of (step, rank): the global stream is epoch after epoch of seeded permutations of all items;
    step s (1-based) takes the next world_size * per_rank of it, rank r its r-th slice."""
    start = ((step - 1) * world_size + rank) * per_rank
    out = []
    for pos in range(start, start + per_rank):
        epoch, i = divmod(pos, num_items)
        perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(step_seed(seed, -1 - epoch, 0)))
        out.append(int(perm[i]))
    return out


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


# ------------------------------------------------------------------------------ DeepSpeed


def import_deepspeed():
    """Import DeepSpeed for this machine. Its TorchBackend JIT-compiles a shared-memory all-reduce op on
    first use (75-130 s on 2 cores; a build killed midway leaves a lock that makes every later build wait
    forever); training never uses that op (only inference_all_reduce does), so it is switched off unless
    MARC_DS_SHM_COMM=1."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import deepspeed.ops

    if os.environ.get("MARC_DS_SHM_COMM") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(cfg: TrainConfig, use_gpu: bool = False) -> dict:
    """The engine's config: ZeRO stage from config, AdamW through torch (no CPU-Adam op build), fp32 on
    CPU and bf16 on GPU when configured, then `cfg.deepspeed_overrides` merged on top."""
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # the policy forms its own batches; DeepSpeed only counts
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.max_grad_norm,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bool(cfg.bf16 and use_gpu)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(conf, dict(cfg.deepspeed_overrides))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_single_process() -> Callable[[], None]:
    """torch.distributed with world size 1 on gloo, without a launcher; returns the cleanup function."""
    deepspeed = import_deepspeed()
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    bind_store_to_master_addr()  # the store would otherwise listen on every interface, even for world size 1
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")

    def cleanup() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        # DeepSpeed caches groups of the destroyed process group; a later run in this process needs fresh ones
        from deepspeed.utils import groups

        for name, value in list(vars(groups).items()):
            if name.startswith("_") and name.isupper() and name.endswith(("_GROUP", "_GROUP_RANKS")):
                setattr(groups, name, {} if isinstance(value, dict) else None)
        groups.mesh_device = None
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)

    return cleanup


def full_state_dict(engine) -> dict[str, Tensor] | None:
    """Full weights on rank 0 (None elsewhere). Collective under ZeRO-3: call it on every rank."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items()} if dist.get_rank() == 0 else None


# ------------------------------------------------------------------------------ checkpoints


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = Path(run_dir) / "checkpoints"
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _publish(tmp: Path, final: Path) -> None:
    """The atomic moment of a save: the temp folder becomes a checkpoint."""
    if final.exists():  # a stale one from an earlier run of the same folder
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def save_checkpoint(engine, run_dir: Path, step: int, cfg: TrainConfig) -> Path:
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(run_dir) / "checkpoints"
    tmp, final = root / f".tmp-step_{step:06d}", root / f"step_{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=CKPT_TAG)
    _write_json(tmp / f"rng_rank{rank}.json", _rng_state())
    dist.barrier()
    if rank == 0:
        _write_json(tmp / "trainer_state.json", {
            "step": step, "world_size": world, "zero_stage": cfg.zero_stage, "seed": cfg.seed,
            "config": cfg.model_dump(mode="json"), "time": time.time(),
        })
        _publish(tmp, final)
        for _, old in complete_checkpoints(run_dir)[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def resume(engine, run_dir: Path) -> int:
    """Load the newest complete checkpoint on every rank; return its step (0 when starting fresh)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    found = [None]
    if rank == 0:
        root = Path(run_dir) / "checkpoints"
        for stale in root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        latest = complete_checkpoints(run_dir)[-1:] or [(0, None)]
        found = [(latest[0][0], str(latest[0][1]) if latest[0][1] else None)]
    dist.broadcast_object_list(found, src=0)
    step, path = found[0]
    if path is None:
        return 0
    state = json.loads((Path(path) / "trainer_state.json").read_text())
    if state["world_size"] != world:
        raise RuntimeError(f"checkpoint {path} was written by {state['world_size']} workers, this run has {world}; "
                           "resume with the same number of workers (or start a new run folder)")
    load_path, _ = engine.load_checkpoint(path, tag=CKPT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path}")
    rng = Path(path) / f"rng_rank{rank}.json"
    if rng.is_file():
        _set_rng_state(json.loads(rng.read_text()))
    return int(step)


def _rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            pass
    return rows


def _cut_metrics(path: Path, last_step: int) -> None:
    """Keep the rows of steps a resumed run will not recompute."""
    if path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in _rows(path) if r["step"] <= last_step))
        os.replace(tmp, path)


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of metrics.jsonl: {"step": s, **metrics}, one per finished step."""
    return _rows(Path(run_dir) / "metrics.jsonl")


# ------------------------------------------------------------------------------ the loop


def _reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Mean over ranks, ignoring NaN (a rank with no value for a metric, e.g. no defined eta)."""
    keys = sorted(metrics)
    vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    present = (~torch.isnan(vals)).to(torch.float64)
    both = torch.stack([torch.nan_to_num(vals, nan=0.0), present])
    dist.all_reduce(both)
    return {k: (both[0, i] / both[1, i]).item() if both[1, i] > 0 else float("nan") for i, k in enumerate(keys)}


def train_loop(
    policy: Policy,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    on_metrics: MetricsCallback | None = None,
    use_gpu: bool = False,
    save_final: bool = True,
) -> dict[str, Any]:
    """Train `cfg.steps` steps from the last checkpoint in `run_dir` (if any). Runs on every rank."""
    t_start = time.perf_counter()
    deepspeed = import_deepspeed()
    run_dir = Path(run_dir)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    dist.barrier()

    seed_everything(cfg.seed)
    model = policy.build_model()
    model.zero_grad(set_to_none=True)  # a gradient left by building (e.g. a warm-up) would leak into step 1 only
    build_ref = getattr(policy, "build_reference", None)
    if build_ref is not None:
        ref_model = build_ref(model)
    else:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.beta > 0 else None
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, use_gpu),
    )
    if ref_model is not None:
        ref_model.to(engine.device)
    start = resume(engine, run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0:
        _cut_metrics(metrics_path, start)

    last: dict[str, float] = {}
    t_loop = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        gen = seed_everything(step_seed(cfg.seed, step, rank))
        ctx = StepContext(step, rank, world, cfg.seed, gen, cfg.updates_per_batch)
        engine.train()
        with torch.no_grad():
            batch = policy.make_batch(engine, ref_model, ctx)
        for u in range(cfg.updates_per_batch):
            loss, metrics = policy.step_loss(engine, batch, replace(ctx, update=u))
            engine.backward(loss)
            engine.step()
        metrics = dict(metrics, lr=engine.get_lr()[0])
        n = getattr(batch, "num_samples", None)
        if step == start + 1:  # the reduction pairs values by sorted key: every rank must report the same keys
            keys: list = [None] * world
            dist.all_gather_object(keys, sorted(metrics))
            if any(k != keys[0] for k in keys):
                raise RuntimeError(f"ranks report different metric keys: {keys}")
        last = _reduce_metrics(metrics)
        last["step_time"] = time.perf_counter() - t0
        if n is not None:
            last["samples_per_second"] = n * world / last["step_time"]
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **last}) + "\n")
            if on_metrics is not None:
                on_metrics(step, last)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(engine, run_dir, step, cfg)

    t_end = time.perf_counter()
    done = max(0, cfg.steps - start)
    timings = {"setup_s": t_loop - t_start, "train_s": t_end - t_loop,
               "steps_per_s": done / (t_end - t_loop) if done else float("nan")}
    final_model = None
    if save_final:
        state = full_state_dict(engine)  # collective under ZeRO-3
        if rank == 0:
            out = run_dir / "final"
            out.mkdir(parents=True, exist_ok=True)
            saver = getattr(policy, "save_final", None)
            if saver is not None:
                final_model = str(saver(state, out))
            else:
                tmp = out / ".model.pt.tmp"
                torch.save(state, tmp)
                os.replace(tmp, out / "model.pt")
                final_model = str(out / "model.pt")
    result = {"step": max(start, cfg.steps), "resumed_from": start, "metrics": last, "final_model": final_model,
              "timings": timings}
    if rank == 0:
        _write_json(run_dir / "result.json", result)
    dist.barrier()
    return result
