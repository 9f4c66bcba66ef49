"""Accuracy per question family with greedy decoding, format compliance, and what the reasoning got right.

Inputs are built with the pipeline's own builders (`build_teacher_inputs` on the teacher's 64
uniform frames, `build_student_inputs` on the question's memory), so what is measured is what
rollout and evaluation will see. Frames come from `VideoItem.frames`: decoded from the MP4 for a
data-set folder (the same `decode_frames` as `load_frames`), or rendered in memory for planned
videos (fast held-out checks during training).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stages.model import runner
from stages.model.inputs import build_student_inputs, build_teacher_inputs, ground_truth_memory
from stages.model.qwen import ModelBundle
from stages.warmup.data import VideoItem, answer_letter, build_batch, examples_of, think_text, with_window

FORMAT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.S)
ANSWER = re.compile(r"<answer>\s*([A-Za-z])\s*</answer>")
CAPTION = re.compile(r"a (\w+) (\w+) moving (\w+) on a (\w+) background")
SLOTS = ("colour", "shape", "direction", "background")


def parse(text: str) -> tuple[bool, str | None, str | None]:
    """(format ok, answer letter or None, think text or None) of one completion."""
    m = FORMAT.fullmatch(text)
    a = ANSWER.search(text)
    return m is not None, (a.group(1).upper() if a else None), (m.group(1) if m else None)


@dataclass
class EvalResult:
    """Per family: questions, correct answers; plus format compliance and reasoning checks."""

    counts: dict[str, int] = field(default_factory=dict)
    correct: dict[str, int] = field(default_factory=dict)
    formatted: int = 0
    think_exact: dict[str, int] = field(default_factory=dict)  # think == answer event's caption
    slot_correct: dict[str, int] = field(default_factory=dict)  # per caption slot, over all questions
    total: int = 0
    samples: list[dict] = field(default_factory=list)  # first few (question, completion) pairs

    @property
    def accuracy(self) -> dict[str, float]:
        return {f: self.correct.get(f, 0) / n for f, n in sorted(self.counts.items()) if n}

    @property
    def overall(self) -> float:
        return sum(self.correct.values()) / max(1, self.total)

    def score(self, question: dict, text: str) -> tuple[str, str | None]:
        """Count one completion: its family's question, a correct letter, the format; returns (family, think)."""
        fam = question.get("family") or "all"
        ok, letter, think = parse(text)
        self.total += 1
        self.counts[fam] = self.counts.get(fam, 0) + 1
        self.correct[fam] = self.correct.get(fam, 0) + int(letter == answer_letter(question))
        self.formatted += int(ok)
        return fam, think

    def metrics(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}acc/{f}": a for f, a in self.accuracy.items()}
        out[f"{prefix}acc/overall"] = self.overall
        out[f"{prefix}format"] = self.formatted / max(1, self.total)
        for f, n in self.counts.items():
            out[f"{prefix}think_exact/{f}"] = self.think_exact.get(f, 0) / n
        for s in SLOTS:
            out[f"{prefix}slot/{s}"] = self.slot_correct.get(s, 0) / max(1, self.total)
        return out


def questions_of(videos: list[VideoItem], per_family: int | None = None) -> list[tuple[VideoItem, dict]]:
    """(video, question) pairs in a fixed order, at most `per_family` of each family."""
    taken: dict[str, int] = defaultdict(int)
    out = []
    for v in videos:
        for q in v.questions:
            f = q.get("family", "all")
            if per_family is None or taken[f] < per_family:
                taken[f] += 1
                out.append((v, q))
    return out


@torch.no_grad()
def evaluate(bundle: ModelBundle, items: list[tuple[VideoItem, dict]], mode: str = "teacher",
             batch_size: int = 16, max_new_tokens: int = 40, top_k: int = 3, fps: float = 1.0,
             max_frames: int = 64, cache_dir: Path | None = None, keep_samples: int = 4) -> EvalResult:
    """Greedy answers to `items`; accuracy per family (exact option letter)."""
    was_training = bundle.model.training
    bundle.model.eval()
    result = EvalResult()
    size = bundle.config.frame_size
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        questions = [q for _, q in chunk]
        if mode == "teacher":
            stamps = [v.teacher_stamps(bundle.config.teacher_frames) for v, _ in chunk]
            frames = [v.frames(s, size, cache_dir) for (v, _), s in zip(chunk, stamps)]
            inputs = build_teacher_inputs(bundle, questions, frames, stamps)
        else:
            memories = [ground_truth_memory(v.events, q["answer_event"], top_k, fps, max_frames) for v, q in chunk]
            frames = [v.frames(m.timestamps, size, cache_dir) for (v, _), m in zip(chunk, memories)]
            inputs = build_student_inputs(bundle, questions, frames, memories, "memory")
        texts = runner.generate(bundle, inputs, max_new_tokens=max_new_tokens).texts
        for (v, q), text in zip(chunk, texts):
            fam, think = result.score(q, text)
            caption = v.events[q["answer_event"]]["caption"]
            wanted = {caption, think_text(q, v.events, "keyed")}  # either reasoning style
            result.think_exact[fam] = result.think_exact.get(fam, 0) + int(think is not None and think.strip() in wanted)
            got = CAPTION.search(think or "")
            want = CAPTION.search(caption)
            for k, s in enumerate(SLOTS):
                result.slot_correct[s] = result.slot_correct.get(s, 0) + int(
                    got is not None and got.group(k + 1) == want.group(k + 1))
            if len(result.samples) < keep_samples:
                result.samples.append({"problem": q["problem"], "solution": q["solution"], "caption": caption,
                                       "completion": text})
    bundle.model.train(was_training)
    return result


@torch.no_grad()
def evaluate_captions(bundle: ModelBundle, videos: list[VideoItem], mode: str = "teacher", limit: int = 32,
                      batch_size: int = 16, cache_dir: Path | None = None) -> dict[str, float]:
    """Greedy single-event captions (the caption task's input) scored per slot: caption/<slot> accuracy."""
    from stages.warmup.data import build_batch, examples_of

    was_training = bundle.model.training
    bundle.model.eval()
    examples = [e for v in videos for e in examples_of(v, {"caption"})][:limit]
    hits: dict[str, int] = defaultdict(int)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs, _, _ = build_batch(bundle, chunk, mode, cache_dir=cache_dir)
        texts = runner.generate(bundle, inputs, max_new_tokens=24).texts
        for ex, text in zip(chunk, texts):
            got, want = CAPTION.search(text), CAPTION.search(ex.video.events[ex.event]["caption"])
            for k, s in enumerate(SLOTS):
                hits[s] += int(got is not None and got.group(k + 1) == want.group(k + 1))
    bundle.model.train(was_training)
    return {f"caption/{s}": hits[s] / max(1, len(examples)) for s in SLOTS}


@torch.no_grad()
def evaluate_clips(bundle: ModelBundle, videos: list[VideoItem], events: int, per_family: int,
                   batch_size: int = 16, max_new_tokens: int = 40, seed: int = 0,
                   think: str = "caption") -> EvalResult:
    """Greedy clip QA (the clipqa task's input: the teacher's frames of `events` consecutive events holding
    the answer, placed at random from `seed`): accuracy per family at one clip size of a scene curriculum."""
    was_training = bundle.model.training
    bundle.model.eval()
    rng = random.Random(seed)
    taken: dict[str, int] = defaultdict(int)
    examples = []
    for v in videos:
        for ex in examples_of(v, {"clipqa"}, think):
            if taken[ex.family] < per_family:
                taken[ex.family] += 1
                examples.append(with_window(ex, events, rng))
    result = EvalResult()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        inputs, _, _ = build_batch(bundle, chunk, "teacher")
        texts = runner.generate(bundle, inputs, max_new_tokens=max_new_tokens).texts
        for ex, text in zip(chunk, texts):
            result.score(ex.question, text)
            if len(result.samples) < 2:
                result.samples.append({"problem": ex.question["problem"], "completion": text})
    bundle.model.train(was_training)
    return result
