"""Stage `warmup`: supervised warm-up of the tiny teacher (mode="teacher") or the SFT student
baseline (mode="student", 1-group compressed memories, starting from the teacher's weights).

`run` returns the checkpoint directory, final metrics and the learning curves; the flow logs them
to MLflow (this module never imports Prefect or MLflow). With `config.model.checkpoint` set (a
pretrained Qwen2.5-VL, GPU preset) the teacher warm-up is skipped and that path is returned.
An unchanged rerun (same mode, model and warm-up config, same training data, same code version)
returns the saved result without training; `force=True` retrains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from data_contracts.config import PipelineConfig
from stages.common.workspace import Workspace
from stages.model.qwen import build_model, load_model
from stages.warmup.data import VideoItem, dataset_videos
from stages.warmup.train import train

STAGE = "warmup"
CODE_VERSION = 1
RESULT_FILE = "warmup_result.json"


@dataclass
class WarmupResult:
    checkpoint_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)  # final held-out accuracy per family, time, steps
    curves: list[dict] = field(default_factory=list)  # loss / accuracy rows against step and minutes
    skipped: bool = False  # pretrained checkpoint: nothing trained
    cached: bool = False  # unchanged rerun: read back


def checkpoint_dir(workspace: Workspace, mode: str) -> Path:
    return workspace.home / "checkpoints" / f"warmup-{mode}"


def _fingerprint(config: PipelineConfig, mode: str, data: Path | None, init: Path | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"stage": STAGE, "code": CODE_VERSION, "mode": mode,
                         "model": config.model.model_dump(mode="json"),
                         "warmup": config.warmup.model_dump(mode="json"),
                         "retrieve": config.retrieve.model_dump(mode="json")}, sort_keys=True).encode())
    if data is not None:
        for name in ("events.jsonl", "questions.jsonl"):
            h.update((data / name).read_bytes())
    if init is not None and (init / RESULT_FILE).is_file():
        h.update((init / RESULT_FILE).read_bytes())
    return h.hexdigest()


def run(config: PipelineConfig, data: Path | str | list[VideoItem], workspace: Workspace, mode: str = "teacher",
        progress: Callable[[int, int], None] | None = None, init_checkpoint: Path | str | None = None,
        force: bool = False, log: Callable[[str], None] | None = None) -> WarmupResult:
    """Warm up the teacher (or train the SFT student) on the training split of `data`.

    data: an EventQA-style folder (events.jsonl, questions.jsonl, videos/; its `train` split is
    used) or ready `VideoItem`s. Student mode starts from `init_checkpoint`, else from the
    teacher checkpoint in this workspace when there is one.
    """
    if mode not in ("teacher", "student"):
        raise ValueError(f"mode must be 'teacher' or 'student', got {mode!r}")
    if config.model.checkpoint and mode == "teacher":
        return WarmupResult(Path(config.model.checkpoint), skipped=True)
    data_dir = None if isinstance(data, list) else Path(data)
    videos = data if isinstance(data, list) else dataset_videos(data_dir, "train")
    out_dir = checkpoint_dir(workspace, mode)
    init = None
    if mode == "student":
        init = Path(init_checkpoint) if init_checkpoint else (
            Path(config.model.checkpoint) if config.model.checkpoint else checkpoint_dir(workspace, "teacher"))
        if not (init / "marc_model.json").is_file() and not config.model.checkpoint:
            raise FileNotFoundError(f"student warm-up starts from a teacher checkpoint; none at {init}"
                                    " (run the teacher warm-up first)")
    fingerprint = _fingerprint(config, mode, data_dir, init) if data_dir is not None else None
    result_file = out_dir / RESULT_FILE
    if fingerprint and not force and result_file.is_file():
        saved = json.loads(result_file.read_text())
        if saved.get("fingerprint") == fingerprint:
            return WarmupResult(out_dir, saved["metrics"], saved["curves"], cached=True)

    if mode == "teacher":
        bundle = build_model(config.model)
    elif config.model.checkpoint and not (init / "marc_model.json").is_file():
        bundle = build_model(config.model)
    else:
        bundle = load_model(init, config.model)
    r = config.retrieve
    outcome = train(bundle, config.warmup, videos, mode, checkpoint_dir=out_dir, top_k=r.top_k, fps=r.fps,
                    max_frames=r.max_frames, cache_dir=workspace.home / "cache" / "frames", progress=progress, log=log)
    final = {k: v for k, v in outcome.evals[-1].items() if k not in ("step", "minutes")} if outcome.evals else {}
    metrics = {**final, "steps": outcome.steps, "minutes": outcome.seconds / 60}
    result_file.write_text(json.dumps({"fingerprint": fingerprint, "mode": mode, "metrics": metrics,
                                       "curves": outcome.curves, "params": bundle.run_params()}, indent=1))
    return WarmupResult(out_dir, metrics, outcome.curves)
