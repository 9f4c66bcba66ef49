"""Shared fixtures-as-functions for the rollout and train stage tests: a tiny EventQA workspace and a
tiny teacher that has learned the answer format (so rewards vary within a group and C-GRPO moves weights).

Sizes: 56 px frames (4 LM tokens per temporal group), 16 teacher frames, a 2-layer LM of width 64;
one training video of ~12 questions. One torch thread: on the shared 2-core machine a second thread
only adds contention (measured: 2-6x slower generation under load).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from data_contracts.config import PipelineConfig
from stages import ingest
from stages import sample_data as eq
from stages.common.workspace import Workspace
from stages.model import runner
from stages.model.inputs import build_student_inputs, load_frames
from stages.model.qwen import build_model, save_model
from stages.train.memory import load_memories, student_memory

SMALL_MODEL = dict(frame_size=56, teacher_frames=16, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=128, vision_hidden_size=32, vision_depth=1, vision_num_heads=4,
                   vision_intermediate_size=64, prompt_style="compact")


def tiny_config(**train) -> PipelineConfig:
    t = dict(group_size=4, questions_per_step=2, steps=3, checkpoint_every=2, max_new_tokens=16,
             learning_rate=1e-3, workers=2, zero_stage=2)
    return PipelineConfig(name="test-tiny", model=SMALL_MODEL, rollout=dict(samples_per_question=4, max_new_tokens=16),
                          train={**t, **train})


def tiny_workspace(root: Path, seed: int = 11) -> tuple[Workspace, Path]:
    """2 generated videos (one train, one test) ingested into a fresh workspace; returns (workspace, data dir)."""
    data = root / "data"
    eq.generate(data, videos=2, seed=seed, width=64, height=64, fps=8, test_fraction=0.5)
    ws = Workspace(root / "home")
    ingest.run(tiny_config(), data, ws)
    return ws, data


def format_teacher(config: PipelineConfig, workspace: Workspace, out_dir: Path, steps: int = 40) -> Path:
    """A random tiny model taught `<think>x</think><answer>L</answer>` with a random letter L on the student's
    inputs (3 s): formats and letters vary across samples, so rewards have spread. Saved as a teacher."""
    torch.manual_seed(0)
    bundle = build_model(config.model)
    from stages.rollout.stage import load_questions

    questions, _ = load_questions(workspace)
    memories = load_memories(workspace, config.retrieve)
    rng = random.Random(0)
    opt = torch.optim.AdamW(bundle.model.parameters(), lr=3e-3)
    bundle.model.train()
    for _ in range(steps):
        qs = rng.sample(questions, 4)
        mems = [student_memory(q, memories) for q in qs]
        frames = [load_frames(bundle, q["video"]["path"], m.timestamps) for q, m in zip(qs, mems)]
        inputs = build_student_inputs(bundle, qs, frames, mems)
        targets = [bundle.tokenizer(f"<think>x</think><answer>{rng.choice('ABCD')}</answer><|im_end|>",
                                    add_special_tokens=False)["input_ids"] for _ in qs]
        logp, mask = runner.completion_logprobs(bundle, inputs, targets)
        loss = -logp.sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    bundle.model.eval()
    return save_model(bundle, out_dir)
