"""Stage evaluate: every arm on the test split, and the report (issue #7).

    items    test-split video questions with their video rows and retrieved memories   test_items
    answer   each arm answers every item greedily (one Ray task per arm, GPUs per      answer_arm
             the preset), scored by the reward plug-ins `accuracy` and `format`
    profile  every arm on the same few items at batch 1, one arm after another in one   efficiency.profile_arms
             task: peak forward memory and latency parts
    report   per arm: accuracy per family and overall, format rate, visual tokens and   summarize, report.write
             their ratio to the baseline, memory, latency, retention; the goals of #7

Weights come from `Checkpoints` (the warmed-up teacher, the SFT student, the C-GRPO student); the
stage never trains. The report lands under `MARC_HOME/reports/<id>/` and `MARC_HOME/reports/latest/`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from data_contracts import schemas
from data_contracts.config import PipelineConfig
from stages.common.arrow_io import read_table
from stages.common.workspace import Workspace
from stages.evaluate import report
from stages.evaluate.arms import BASELINE, WEIGHTS, Arm, TestItem, arms_for, build_inputs
from stages.evaluate.efficiency import profile_arms
from stages.model import runner
from stages.model.qwen import BUNDLE_FILE, ModelBundle, load_model
from stages.rollout.stage import load_teacher
from stages.train.memory import load_memories, student_memory
from stages.train.rewards import accuracy_reward, format_reward

STAGE = "evaluate"
# Goals of issue #7 for the C-GRPO student against the 64-frame baseline.
TOKEN_RATIO_GOAL = 0.032
RETENTION_GOAL = 0.95
RETENTION_FAMILIES = ("colour", "shape")
MUST_BEAT = ("teacher_1group", "merge_uniform", "vmr_compress", "sft_student")


@dataclass(frozen=True)
class Checkpoints:
    """Weights of each arm kind: a `save_model` folder (or, for the teacher, a pretrained checkpoint)."""

    teacher: str
    sft: str | None = None
    cgrpo: str | None = None
    train_run: str | None = None  # the C-GRPO run folder (metrics.jsonl: the training curves)

    @classmethod
    def from_workspace(cls, config: PipelineConfig, workspace: Workspace) -> "Checkpoints":
        """What a workspace has: the warmed-up teacher (or the preset's pretrained one), the SFT
        student of stage warmup (mode student), the last trained C-GRPO student."""
        from stages.train.stage import latest_student
        from stages.warmup.stage import checkpoint_dir

        def saved(mode: str) -> str | None:
            folder = checkpoint_dir(workspace, mode)
            return str(folder) if (folder / BUNDLE_FILE).is_file() else None

        teacher = config.model.checkpoint or saved("teacher")
        if teacher is None:
            raise FileNotFoundError(f"no teacher checkpoint in {workspace.home}: run stage warmup first")
        trained = latest_student(workspace)
        return cls(teacher, saved("student"), str(trained[0]) if trained else None,
                   str(trained[1]) if trained else None)

    def path(self, weights: str) -> str:
        value = getattr(self, weights)
        if not value:
            raise FileNotFoundError(f"no {weights} checkpoint to evaluate: run stage "
                                    f"{'train' if weights == 'cgrpo' else 'warmup'} first")
        return value


@dataclass
class EvaluateResult:
    report: dict  # what report.json holds
    report_dir: Path  # MARC_HOME/reports/<id>
    latest_dir: Path  # MARC_HOME/reports/latest
    markdown: str


def load_weights(checkpoint: str | Path, config: PipelineConfig, device: str = "cpu") -> ModelBundle:
    bundle = (load_model(checkpoint, config.model) if (Path(checkpoint) / BUNDLE_FILE).is_file()
              else load_teacher(checkpoint, config.model))
    bundle.model.to(device).eval()
    return bundle


# ------------------------------------------------------------------------------------------ items


def test_items(config: PipelineConfig, workspace: Workspace) -> tuple[list[TestItem], dict[str, int]]:
    """The test split's video questions with their memories; and how many were left out, and why."""
    for name in ("questions", "videos"):
        if not workspace.table(name).is_file():
            raise FileNotFoundError(f"no {name} table at {workspace.table(name)}: run stage ingest first")
    videos = {v["video_id"]: v for v in read_table(workspace.table("videos"), schemas.VIDEOS).to_pylist()}
    memories = load_memories(workspace, config.retrieve)
    items, skipped = [], {"train": 0, "image": 0, "no_video": 0, "no_memory": 0}
    for q in read_table(workspace.table("questions"), schemas.QUESTIONS).to_pylist():
        video = videos.get(q["video_id"])
        if q["split"] != "test":
            skipped["train"] += 1
        elif q["data_type"] != "video":
            skipped["image"] += 1
        elif video is None or video["media_type"] != "video":
            skipped["no_video"] += 1
        else:
            try:
                memory = student_memory(q, memories)
            except (KeyError, ValueError):  # retrieval found no events for it
                skipped["no_memory"] += 1
                continue
            items.append(TestItem(q, video["path"], video["content_sha256"], float(video["duration"]),
                                  float(video["fps"]), memory))
    if not items:
        raise ValueError(f"no test-split video questions to evaluate in {workspace.home} (left out: {skipped})")
    return items, {**skipped, "memory_source": memories.source}


def profile_items(items: list[TestItem], count: int) -> list[TestItem]:
    """`count` items spread over the families (round robin), in a fixed order."""
    by_family: dict[str, list[TestItem]] = defaultdict(list)
    for item in items:
        by_family[item.family].append(item)
    out: list[TestItem] = []
    while len(out) < min(count, len(items)):
        for family in sorted(by_family):
            if by_family[family] and len(out) < count:
                out.append(by_family[family].pop(0))
    return out


# ------------------------------------------------------------------------------------------ answer


@torch.no_grad()
def answer_arm(config: PipelineConfig, arm: Arm, items: list[TestItem], checkpoint: str, cache_dir: Path | None,
               num_gpus: int = 0, progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row per item: family, accuracy (Video-R1 rule of its problem type), format, visual tokens, text."""
    if num_gpus and not torch.cuda.is_available():
        raise RuntimeError(f"stage {STAGE}: {num_gpus} GPU(s) were given to this task but torch sees no CUDA device")
    cfg = config.evaluate
    bundle = load_weights(checkpoint, config, "cuda" if num_gpus else "cpu")
    rows: list[dict] = []
    for start in range(0, len(items), cfg.batch_size):
        chunk = items[start:start + cfg.batch_size]
        inputs = build_inputs(arm, bundle, chunk, cache_dir).to(bundle.device)
        torch.manual_seed(cfg.seed)  # only matters with temperature > 0
        gen = runner.generate(bundle, inputs, cfg.max_new_tokens, cfg.temperature)
        for item, text, tokens in zip(chunk, gen.texts, inputs.visual_tokens):
            q = item.question
            rows.append({"question_id": q["question_id"], "family": item.family, "completion": text,
                         "accuracy": accuracy_reward(text, solution=q["solution"],
                                                     problem_type=q["problem_type"])["accuracy"],
                         "format": format_reward(text)["format"], "visual_tokens": int(tokens)})
        if progress:
            progress(len(rows), len(items))
    return rows


def profile_all(config: PipelineConfig, arms: list[Arm], items: list[TestItem], checkpoints: Checkpoints,
                num_gpus: int = 0) -> dict[str, dict]:
    """arm -> cost profile; each profile also records the torch threads it ran with (`threads`)."""
    device = "cuda" if num_gpus else "cpu"
    bundles = {w: load_weights(checkpoints.path(w), config, device) for w in {a.weights for a in arms}}
    profiles = profile_arms(arms, bundles, items, config.evaluate.latency_new_tokens, config.evaluate.latency_repeats)
    return {name: {**p, "threads": torch.get_num_threads()} for name, p in profiles.items()}


# ------------------------------------------------------------------------------------------ summarize


def summarize(arms: list[Arm], answers: dict[str, list[dict]], profiles: dict[str, dict]) -> dict[str, dict]:
    """Per arm: accuracy per family and overall, format rate, visual tokens and ratio, cost, retention."""
    out: dict[str, dict] = {}
    for arm in arms:
        rows = answers[arm.name]
        families: dict[str, list[float]] = defaultdict(list)
        for r in rows:
            families[r["family"]].append(r["accuracy"])
        accuracy = {f: sum(v) / len(v) for f, v in sorted(families.items())}
        accuracy["overall"] = sum(r["accuracy"] for r in rows) / len(rows)
        profile = profiles.get(arm.name, {})
        out[arm.name] = {
            "label": arm.label, "weights": arm.weights, "frames": arm.frames, "compression": arm.compression,
            "questions": len(rows), "accuracy": accuracy,
            "format_rate": sum(r["format"] for r in rows) / len(rows),
            "visual_tokens": sum(r["visual_tokens"] for r in rows) / len(rows),
            "peak_forward_bytes": profile.get("peak_forward_bytes"),
            "latency_s": {k: profile[k] for k in ("vision", "prefill", "generation", "end_to_end") if k in profile},
            "samples": [{k: r[k] for k in ("question_id", "family", "completion", "accuracy")} for r in rows[:3]],
        }
    base = out.get(BASELINE)
    for arm in out.values():
        arm["visual_token_ratio"] = arm["visual_tokens"] / base["visual_tokens"] if base else None
        arm["retention"] = {f: (a / base["accuracy"][f] if base and base["accuracy"].get(f) else None)
                            for f, a in arm["accuracy"].items()}
    return out


def check_goals(arms: dict[str, dict]) -> list[dict]:
    """The goals of issue #7 for the C-GRPO student: each with the measured value and met/missed."""
    student, base = arms.get("cgrpo_student"), arms.get(BASELINE)
    if not student or not base:
        return []
    goals = [{"goal": f"visual tokens <= {TOKEN_RATIO_GOAL:.1%} of the baseline",
              "value": student["visual_token_ratio"], "met": student["visual_token_ratio"] <= TOKEN_RATIO_GOAL}]
    for family in RETENTION_FAMILIES:
        r = student["retention"].get(family)
        if family in base["accuracy"]:
            goals.append({"goal": f"{family}: accuracy >= {RETENTION_GOAL:.0%} of the baseline's",
                          "value": r, "met": r is not None and r >= RETENTION_GOAL})
    for other in MUST_BEAT:
        if other in arms:
            a, b = student["accuracy"]["overall"], arms[other]["accuracy"]["overall"]
            goals.append({"goal": f"overall accuracy above {other}", "value": a - b, "met": a > b})
    return goals


# ------------------------------------------------------------------------------------------ run


def run(config: PipelineConfig, workspace: Workspace, checkpoints: Checkpoints, use_ray: bool = False,
        num_gpus: int = 0, progress: Callable[[int, int], None] | None = None, report_id: str | None = None,
        data_label: str = "", reports_root: Path | None = None) -> EvaluateResult:
    """Answer, profile, summarize and write the report (see the module docstring).

    reports_root: where report folders go (default MARC_HOME/reports of `workspace`; a data set
    evaluated in a workspace of its own reports next to the models' workspace instead)."""
    items, skipped = test_items(config, workspace)
    wanted = set(config.evaluate.arms or [])
    arms = [a for a in arms_for(config) if not wanted or a.name in wanted]
    for weights in {a.weights for a in arms}:
        checkpoints.path(weights)  # fail now, not after an hour of answering
    cache = workspace.home / "cache" / "frames"
    few = profile_items(items, config.evaluate.profile_questions)
    if use_ray:
        answers, profiles = _on_ray(config, arms, items, few, checkpoints, cache, num_gpus, progress)
    else:
        answers, done = {}, 0
        for arm in arms:
            answers[arm.name] = answer_arm(config, arm, items, checkpoints.path(arm.weights), cache, num_gpus)
            done += len(items)
            if progress:
                progress(done, len(items) * len(arms))
        profiles = profile_all(config, arms, few, checkpoints, num_gpus) if few else {}
    summary = summarize(arms, answers, profiles)
    payload = {
        "preset": config.name, "data": data_label, "baseline": BASELINE,
        "questions": len(items), "left_out": skipped, "profile_questions": len(few),
        "decoding": {"temperature": config.evaluate.temperature, "max_new_tokens": config.evaluate.max_new_tokens,
                     "latency_new_tokens": config.evaluate.latency_new_tokens},
        "device": "cuda" if num_gpus else "cpu",
        "threads": next((p["threads"] for p in profiles.values()), torch.get_num_threads()),
        "checkpoints": {w: getattr(checkpoints, w) for w in WEIGHTS},
        "arms": summary, "goals": check_goals(summary),
    }
    curves = report.training_curves(checkpoints.train_run)
    root = Path(reports_root) if reports_root else workspace.home / "reports"
    return EvaluateResult(payload, *report.write(payload, root, report_id, curves))


def _on_ray(config, arms, items, few, checkpoints, cache, num_gpus, progress):
    import ray

    task = ray.remote(answer_arm).options(num_gpus=num_gpus, num_cpus=config.compute.cpus_per_task, max_retries=0)
    refs = {task.remote(config, arm, items, checkpoints.path(arm.weights), cache, num_gpus): arm.name for arm in arms}
    answers, pending = {}, list(refs)
    while pending:
        ready, pending = ray.wait(pending)
        for ref in ready:
            answers[refs[ref]] = ray.get(ref)
        if progress:
            progress(len(answers) * len(items), len(arms) * len(items))
    profiles = {}
    if few:  # alone on the cluster, after every answer task: timings are not shared with other arms
        profiles = ray.get(ray.remote(profile_all).options(num_gpus=num_gpus, num_cpus=config.compute.cpus_per_task,
                                                           max_retries=0).remote(config, arms, few, checkpoints, num_gpus))
    return answers, profiles


def read_latest(home: Path) -> dict:
    """report.json of the latest evaluation under `home` (MARC_HOME)."""
    path = Path(home) / "reports" / "latest" / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"no report at {path}: run stage evaluate first")
    return json.loads(path.read_text())
