"""Stage train: C-GRPO training of the compressed-input student, in Ray Train or in-process (issue #6).

    run(config, workspace, teacher_dir, use_ray=True, num_gpus=0, on_metrics=None) -> TrainResult

Inputs: the teacher checkpoint (the student starts from it), the rollouts table (a_full per question;
it must be up to date with this teacher: `rollout.plan` is a no-op), the questions and videos tables,
and the student memories (`memory.load_memories`: the retrieve stage's table, else ground truth).

Run folder: `MARC_HOME/runs/train/<fingerprint>/` (layout in `engine.py`); the student is saved with
`save_pretrained` (+ tokenizer, marc_model.json) to `<run>/final/student`, loadable with `load_model`.
The fingerprint hashes what determines the weights at step s: the train config (except `steps` and
the checkpoint/retry bookkeeping), the model's run-time fields, the world size, the teacher's hash, the
rollouts' fingerprints and the memories' fingerprint. So:
  - a rerun after a crash finds the same folder and resumes from its last checkpoint;
  - a rerun of a completed run (same fingerprint, step >= train.steps, student saved) trains nothing
    and returns the saved student;
  - raising `train.steps` continues the same run from its last checkpoint;
  - anything else that changes starts a new folder (`force=True` deletes the folder and starts over).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from data_contracts.config import PipelineConfig
from stages.common import incremental
from stages.common.workspace import Workspace
from stages.model.qwen import RUNTIME_FIELDS
from stages.rollout import stage as rollout
from stages.train.engine import MetricsCallback, read_metrics
from stages.train.launch import launch
from stages.train.memory import load_memories, student_memory
from stages.train.qwen_policy import QwenPolicy, TrainItem

STAGE = "train"
CODE_VERSION = "1"
# Do not change step s's weights: left out of the run fingerprint.
BOOKKEEPING = ("steps", "checkpoint_every", "keep_checkpoints", "max_failures", "placement_strategy")


@dataclass
class TrainResult:
    student_dir: Path  # save_pretrained folder of the trained student
    metrics: dict[str, float]  # last trained step's metrics (mean over ranks); {} when nothing was trained
    steps: int  # optimizer steps the student has had
    resumed_from: int  # step of the checkpoint this run started from (0: fresh)
    run_dir: Path = Path()
    cached: bool = False  # a completed run with this fingerprint existed: nothing was trained
    counts: dict = field(default_factory=dict)  # questions, memory source, fingerprint, timings


def training_items(config: PipelineConfig, workspace: Workspace, teacher_dir: str | Path
                   ) -> tuple[list[TrainItem], dict]:
    """The training questions with their memories and a_full; raises when the rollouts are stale."""
    pending = rollout.plan(config, workspace, teacher_dir)
    if not pending.is_noop:
        raise RuntimeError(f"the rollouts table is not up to date with this teacher and these questions "
                           f"({len(pending.compute)} to compute, {len(pending.remove)} to remove): "
                           "run stage rollout first")
    a_full = rollout.load_a_full(workspace)
    memories = load_memories(workspace, config.retrieve)
    questions, _ = rollout.load_questions(workspace)
    items = []
    for q in questions:
        video = q.pop("video")
        items.append(TrainItem(question=q, video_path=video["path"], video_key=video["content_sha256"],
                               memory=student_memory(q, memories), a_full=a_full.get(q["question_id"])))
    info = {"questions": len(items), "memory_source": memories.source, "memory_fingerprint": memories.fingerprint,
            "rollouts_fingerprint": _hash(pending.fingerprints), "teacher": rollout.checkpoint_hash(teacher_dir)}
    return items, info


def run_fingerprint(config: PipelineConfig, info: dict, workers: int, use_gpu: bool) -> str:
    train = config.train.model_dump(mode="json", exclude=set(BOOKKEEPING))
    fields = {"train": {**train, "workers": workers}, "use_gpu": use_gpu,
              "model": {k: getattr(config.model, k) for k in RUNTIME_FIELDS if k != "teacher_frames"}}
    return incremental.fingerprint(STAGE, CODE_VERSION, fields,
                                   [info["teacher"], info["rollouts_fingerprint"], info["memory_fingerprint"]])


def run(config: PipelineConfig, workspace: Workspace, teacher_dir: str | Path, use_ray: bool = True,
        num_gpus: int = 0, on_metrics: MetricsCallback | None = None, force: bool = False) -> TrainResult:
    """Train the student (`train.workers` Ray Train workers, or one process with use_ray=False).

    num_gpus: GPUs per worker, resolved by the caller (the flow calls infra's require_gpus): 0 trains on
    CPU with gloo, 1 on one GPU per worker (launch fails at once if the cluster has too few).
    """
    if num_gpus not in (0, 1):
        raise ValueError(f"train uses 0 or 1 GPU per worker, not {num_gpus}")
    items, info = training_items(config, workspace, teacher_dir)
    workers = config.train.workers if use_ray else 1
    cfg = config.train.model_copy(update={"workers": workers})
    fp = run_fingerprint(config, info, workers, num_gpus > 0)
    run_dir = workspace.home / "runs" / STAGE / fp
    student_dir = run_dir / "final" / "student"
    counts = {**info, "fingerprint": fp, "workers": workers, "zero_stage": cfg.zero_stage}
    if force:
        shutil.rmtree(run_dir, ignore_errors=True)

    done = _completed(run_dir, student_dir, cfg.steps)
    if done is not None:
        _point_latest(workspace, student_dir, run_dir)
        return TrainResult(student_dir, done["metrics"], done["step"], done["step"], run_dir, cached=True,
                           counts=counts)

    policy = QwenPolicy(config.model_copy(update={"train": cfg}), teacher_dir, items,
                        frame_cache=workspace.home / "cache" / "frames", use_gpu=num_gpus > 0)
    result = launch(policy, cfg, run_dir, on_metrics=on_metrics, use_ray=use_ray, use_gpu=num_gpus > 0)
    counts.update(result.get("timings", {}))
    (run_dir / "stage.json").write_text(json.dumps({"counts": counts, "steps": result["step"]}, indent=1))
    final = Path(result["final_model"] or student_dir)
    _point_latest(workspace, final, run_dir)
    return TrainResult(final, result["metrics"], result["step"], result["resumed_from"], run_dir, counts=counts)


def latest_pointer(workspace: Workspace) -> Path:
    """JSON naming the last trained student and its run folder (what evaluate and `marc answer` use)."""
    return workspace.home / "checkpoints" / "student-latest.json"


def latest_student(workspace: Workspace) -> tuple[Path, Path] | None:
    """(student folder, run folder) of the last completed train run in this workspace, or None."""
    pointer = latest_pointer(workspace)
    if not pointer.is_file():
        return None
    data = json.loads(pointer.read_text())
    student = Path(data["student"])
    return (student, Path(data["run_dir"])) if (student / "marc_model.json").is_file() else None


def _point_latest(workspace: Workspace, student_dir: Path, run_dir: Path) -> None:
    pointer = latest_pointer(workspace)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(pointer.name + ".tmp")
    tmp.write_text(json.dumps({"student": str(student_dir), "run_dir": str(run_dir)}))
    tmp.replace(pointer)


def _completed(run_dir: Path, student_dir: Path, steps: int) -> dict | None:
    """The saved result of a finished run of this fingerprint (with the last trained step's metrics)."""
    result_file = run_dir / "result.json"
    if not (result_file.is_file() and (student_dir / "marc_model.json").is_file()):
        return None
    result = json.loads(result_file.read_text())
    if result["step"] < steps:
        return None
    rows = read_metrics(run_dir)
    last = {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}
    return {"step": result["step"], "metrics": last}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]
