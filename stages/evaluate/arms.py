"""The arms of the evaluation: which weights see which frames, and how they reach the language model.

Every arm answers the same test questions with the same decoding settings; they differ in three
choices only, so the report compares like with like:

    weights      teacher (warmed up / pretrained) | sft (the SFT student, #5) | cgrpo (the trained student, #6)
    frames       uniform n frames over the whole video | the question's retrieved memory (VMR, #4)
    compression  none (every temporal group reaches the LM) | memory-aware merging (DESIGN.md §1)

Uniform frames + compression merge all frames as one event (no boundaries): the training-free,
MovieChat-style baseline. Inputs are built by the pipeline's own builders, so an arm measures what
rollout and training feed the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_contracts.config import PipelineConfig
from stages.model.inputs import (
    Memory,
    ModelInputs,
    build_student_inputs,
    build_teacher_inputs,
    load_frames,
    teacher_timestamps,
)
from stages.model.qwen import ModelBundle

WEIGHTS = ("teacher", "sft", "cgrpo")
BASELINE = "teacher_full"


@dataclass(frozen=True)
class Arm:
    name: str  # key in report.json
    label: str  # what the report prints
    weights: str  # one of WEIGHTS
    frames: str  # "uniform" | "memory"
    compression: str  # "none" | "memory"
    uniform_frames: int = 0  # frames sampled uniformly (frames == "uniform")


def arms_for(config: PipelineConfig) -> list[Arm]:
    """The paper's table at our scale; frame counts follow the preset (64 / 16 / 2 on the defaults)."""
    full = config.model.teacher_frames
    quarter = max(2, full // 4 // 2 * 2)
    return [
        Arm(BASELINE, f"teacher, {full} uniform frames", "teacher", "uniform", "none", full),
        Arm("teacher_quarter", f"teacher, {quarter} uniform frames", "teacher", "uniform", "none", quarter),
        Arm("teacher_1group", "teacher, 1 uniform temporal group (2 frames)", "teacher", "uniform", "none", 2),
        Arm("teacher_vmr", "teacher + VMR, retrieved frames uncompressed", "teacher", "memory", "none"),
        Arm("merge_uniform", f"training-free: {full} uniform frames merged to 1 group, no event boundaries",
            "teacher", "uniform", "memory", full),
        Arm("vmr_compress", "training-free: VMR + memory-aware compression, teacher weights",
            "teacher", "memory", "memory"),
        Arm("sft_student", "SFT student: VMR + compression", "sft", "memory", "memory"),
        Arm("cgrpo_student", "C-GRPO student (MARC): VMR + compression", "cgrpo", "memory", "memory"),
    ]


@dataclass(frozen=True)
class TestItem:
    """One test question with what every arm needs to build its input (picklable, for Ray tasks)."""

    question: dict  # questions-table row
    video_path: str
    video_key: str  # content hash: key of the shared frame cache
    duration: float
    fps: float
    memory: Memory  # the retrieved memory (frames grouped by event)

    @property
    def family(self) -> str:
        return self.question.get("family") or "all"


def arm_frames(arm: Arm, item: TestItem, bundle: ModelBundle, cache_dir: Path | None
               ) -> tuple[np.ndarray, list[float], list[int]]:
    """(uint8 [N, H, W, 3] frames, their timestamps, frames per event) of one question for one arm."""
    if arm.frames == "uniform":
        stamps = teacher_timestamps(item.duration, item.fps, arm.uniform_frames)
        events = [len(stamps)]  # one event: uniform sampling knows no boundaries
    else:
        stamps, events = list(item.memory.timestamps), list(item.memory.event_frames)
    return load_frames(bundle, item.video_path, stamps, cache_dir, item.video_key), stamps, events


def build_inputs(arm: Arm, bundle: ModelBundle, items: list[TestItem], cache_dir: Path | None) -> ModelInputs:
    """The arm's batch of inputs for `items`."""
    questions, clips, stamps, memories = [], [], [], []
    for item in items:
        frames, ts, events = arm_frames(arm, item, bundle, cache_dir)
        questions.append(item.question)
        clips.append(frames)
        stamps.append(ts)
        memories.append(Memory(ts, events))
    if arm.frames == "uniform" and arm.compression == "none":
        return build_teacher_inputs(bundle, questions, clips, stamps)
    # Retrieved frames uncompressed go through the student path with identity compression: each event
    # is padded to whole temporal groups on its own, exactly what the compressed arms start from.
    return build_student_inputs(bundle, questions, clips, memories,
                                "identity" if arm.compression == "none" else "memory")
