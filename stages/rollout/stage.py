"""Stage rollout: the teacher's cached answers on 64-frame inputs, per-question incremental (issue #6).

    plan     which training questions changed since the last run (fingerprints), which vanished
    compute  the teacher answers some questions G_t times each (a shard; touches no table)
    commit   reused rows + computed rows -> the rollouts table, atomically

`run` does all three (in this process, or with `use_ray=True` one Ray task per shard, each asking
for `num_gpus` GPUs); the flow may also run `compute` per shard itself, as it does for segment.

What is computed for one question (video questions of the `train` split only):
    frames   `teacher_timestamps(duration, fps, model.teacher_frames)`: 64 frames uniform over the video
    sample   `runner.generate(teacher, inputs, rollout.max_new_tokens, rollout.temperature,
             num_samples=G_t)` with torch seeded from (rollout.seed, question_id) alone, so a rerun, a
             different shard layout or a resumed run draws the same completions
    score    every completion by the reward plug-ins `train.reward_names` (`rewards.score_group`, no
             retention bonus), a_full = mean accuracy of the G_t completions

Table layout: one Arrow file `tables/rollouts.arrow` (schema `ROLLOUTS`), G_t rows per question
sorted by (question_id, sample_index); every row carries its question's fingerprint, and the schema
metadata `marc.items` maps every question to its fingerprint. Table and bookkeeping are one file,
replaced atomically (temp file, fsync, rename), so a rerun with the same teacher writes nothing and a
changed question (or a new teacher, or new sampling settings) recomputes just what it touches.

Fingerprint of a question = hash(stage, code version, rollout config, teacher_frames, dtype,
train.reward_names; teacher checkpoint hash, the question's content, its video's content hash).

Crash safety of long runs: each computed question is also written to
`MARC_HOME/cache/rollout/<fingerprint>.json` as soon as it is done; a rerun after a crash reads it
back instead of generating again; `commit` deletes those files once the table holds them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import torch

from data_contracts import schemas
from data_contracts.config import ModelConfig, PipelineConfig
from stages.common import incremental
from stages.common.arrow_io import read_table, write_bytes_atomic
from stages.common.workspace import Workspace
from stages.model import runner
from stages.model.inputs import build_teacher_inputs, load_frames, teacher_timestamps
from stages.model.qwen import BUNDLE_FILE, ModelBundle, load_checkpoint, load_model
from stages.train.rewards import accuracy_reward, score_group

STAGE = "rollout"
CODE_VERSION = "1"
QUESTION_FIELDS = ("question_id", "video_id", "problem", "options", "solution", "problem_type", "data_type")


@dataclass
class QuestionRollouts:
    """What compute produced for one question: its G_t rows of the ROLLOUTS table."""

    question_id: str
    fingerprint: str
    rows: list[dict] = field(default_factory=list)
    cached: bool = False  # read back from a crashed run's per-question file, not generated


@dataclass
class RolloutResult:
    counts: dict  # computed / reused / removed / questions / rows / skipped / seconds / questions_per_second ...
    path: Path
    wrote: bool


# ------------------------------------------------------------------------------------------ teacher


_HASHES: dict[tuple, str] = {}


def checkpoint_hash(directory: str | Path) -> str:
    """sha256 over every file of a model directory (names and bytes); memoised on (name, size, mtime)."""
    directory = Path(directory).resolve()
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"teacher checkpoint {directory} is missing or empty: run stage warmup first")
    key = (str(directory), tuple((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
                                 for p in files))
    if key not in _HASHES:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(directory)).encode() + b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        _HASHES[key] = h.hexdigest()[:24]
    return _HASHES[key]


def load_teacher(teacher_dir: str | Path, model: ModelConfig) -> ModelBundle:
    """A `save_model` directory (the warmed-up teacher), or a raw pretrained Qwen2.5-VL checkpoint."""
    teacher_dir = Path(teacher_dir)
    if (teacher_dir / BUNDLE_FILE).is_file():
        return load_model(teacher_dir, model)
    return load_checkpoint(model.model_copy(update={"checkpoint": str(teacher_dir)}))


def resolve_gpus(requested: int | str, cluster_resources: dict) -> int:
    """GPUs per task, as infra.stack.require_gpus: "auto" = 1 where the cluster has a GPU, else 0; asking
    for more than the cluster has fails now (a Ray task would otherwise pend forever)."""
    available = float(cluster_resources.get("GPU", 0) or 0)
    if requested == "auto":
        return 1 if available >= 1 else 0
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"gpus_per_task must be 'auto' or a whole number >= 0, not {requested!r}")
    if requested > available:
        raise RuntimeError(f"stage {STAGE} asks for {requested} GPU(s) per task but the cluster has {available:g} "
                           f"(resources: {dict(cluster_resources)}); it would wait forever. Set "
                           "compute.gpus_per_task to 'auto' or 0, or connect a cluster with GPUs (MARC_RAY_ADDRESS).")
    return requested


# ------------------------------------------------------------------------------------------ plan


def config_fields(config: PipelineConfig) -> dict:
    """The config this stage reads: a change to any of it recomputes every question."""
    return {"rollout": config.rollout.model_dump(mode="json"), "teacher_frames": config.model.teacher_frames,
            "dtype": config.model.dtype, "reward_names": list(config.train.reward_names)}


def load_questions(workspace: Workspace) -> tuple[list[dict], dict[str, int]]:
    """Video questions of the train split, each with its video row under "video"; and skip counts."""
    for name in ("questions", "videos"):
        if not workspace.table(name).is_file():
            raise FileNotFoundError(f"no {name} table at {workspace.table(name)}: run stage ingest first")
    videos = {v["video_id"]: v for v in read_table(workspace.table("videos"), schemas.VIDEOS).to_pylist()}
    out, skipped = [], {"test": 0, "image": 0, "no_video": 0}
    for q in read_table(workspace.table("questions"), schemas.QUESTIONS).to_pylist():
        if q["split"] != "train":
            skipped["test"] += 1
        elif q["data_type"] != "video":
            skipped["image"] += 1
        elif q["video_id"] not in videos or videos[q["video_id"]]["media_type"] != "video":
            skipped["no_video"] += 1
        else:
            out.append({**q, "video": videos[q["video_id"]]})
    return out, skipped


def question_fingerprint(config: PipelineConfig, question: dict, teacher: str) -> str:
    content = hashlib.sha256(json.dumps({k: question[k] for k in QUESTION_FIELDS}, sort_keys=True).encode())
    return incremental.fingerprint(STAGE, CODE_VERSION, config_fields(config),
                                   [teacher, content.hexdigest(), question["video"]["content_sha256"]])


def plan(config: PipelineConfig, workspace: Workspace, teacher_dir: str | Path,
         force: bool = False) -> incremental.Plan:
    teacher = checkpoint_hash(teacher_dir)
    questions, _ = load_questions(workspace)
    current = {q["question_id"]: question_fingerprint(config, q, teacher) for q in questions}
    previous = incremental.load_previous(workspace.table("rollouts"), schemas.ROLLOUTS)
    return incremental.plan_items(current, previous, force)


# ------------------------------------------------------------------------------------------ compute


def sample_seed(seed: int, question_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"marc-rollout:{seed}:{question_id}".encode()).digest()[:8], "little") >> 1


def scratch_path(workspace: Workspace, fingerprint: str) -> Path:
    return workspace.home / "cache" / STAGE / f"{fingerprint}.json"


def rollout_question(bundle: ModelBundle, config: PipelineConfig, question: dict, fingerprint: str,
                     frame_cache: Path | None = None) -> QuestionRollouts:
    """The teacher answers one question G_t times on its 64-frame input; every answer scored."""
    cfg, video = config.rollout, question["video"]
    stamps = teacher_timestamps(video["duration"], video["fps"], bundle.config.teacher_frames)
    frames = load_frames(bundle, video["path"], stamps, frame_cache, video["content_sha256"])  # uint8 [N, H, W, 3]
    inputs = build_teacher_inputs(bundle, [question], [frames], [stamps]).to(bundle.device)
    torch.manual_seed(sample_seed(cfg.seed, question["question_id"]))
    gen = runner.generate(bundle, inputs, cfg.max_new_tokens, cfg.temperature,
                          num_samples=cfg.samples_per_question)  # G_t completions
    scores = score_group(gen.texts, question["solution"], question["problem_type"], question["data_type"],
                         a_full=None, alpha=0.0, tau=0.0, reward_names=config.train.reward_names,
                         correct_threshold=config.train.correct_threshold)
    accuracy = scores.components.get("accuracy") or [  # "accuracy" not among the plug-ins: computed anyway
        accuracy_reward(t, solution=question["solution"], problem_type=question["problem_type"])["accuracy"]
        for t in gen.texts]
    rows = [dict(question_id=question["question_id"], fingerprint=fingerprint, sample_index=j, completion=text,
                 num_tokens=n, reward_format=scores.components["format"][j] if "format" in scores.components else None,
                 reward_accuracy=accuracy[j], reward_total=scores.totals[j], a_full=scores.a_comp)
            for j, (text, n) in enumerate(zip(gen.texts, gen.num_tokens))]
    return QuestionRollouts(question["question_id"], fingerprint, rows)


def compute(config: PipelineConfig, questions: list[dict], fingerprints: dict[str, str], workspace: Workspace,
            teacher_dir: str | Path, progress: Callable[[int, int], None] | None = None,
            num_gpus: int = 0) -> list[QuestionRollouts]:
    """Roll out `questions` (rows from `load_questions`); runs anywhere, writes only its scratch files."""
    if num_gpus and not torch.cuda.is_available():
        raise RuntimeError(f"stage {STAGE}: {num_gpus} GPU(s) were given to this task but torch sees no CUDA device")
    out: list[QuestionRollouts] = []
    bundle = None
    for i, q in enumerate(questions, start=1):
        fp = fingerprints[q["question_id"]]
        scratch = scratch_path(workspace, fp)
        if scratch.is_file():  # done by a run that died before its commit
            out.append(QuestionRollouts(q["question_id"], fp, json.loads(scratch.read_text()), cached=True))
        else:
            if bundle is None:  # loaded lazily: a resumed shard whose questions are all done loads nothing
                bundle = load_teacher(teacher_dir, config.model)
                bundle.model.to("cuda" if num_gpus else "cpu").eval()
            with torch.no_grad():
                item = rollout_question(bundle, config, q, fp, workspace.home / "cache" / "frames")
            write_bytes_atomic(json.dumps(item.rows).encode(), scratch)
            out.append(item)
        if progress:
            progress(i, len(questions))
    return out


# ------------------------------------------------------------------------------------------ commit


def commit(plan: incremental.Plan, computed: list[QuestionRollouts], workspace: Workspace) -> RolloutResult:
    path = workspace.table("rollouts")
    previous = incremental.load_previous(path, schemas.ROLLOUTS)
    missing = set(plan.compute) - {c.question_id for c in computed}
    if missing:
        raise ValueError(f"commit is missing the rollouts of {len(missing)} planned question(s), "
                         f"e.g. {sorted(missing)[:3]}")
    new_rows = pa.Table.from_pylist([r for c in computed for r in c.rows], schema=schemas.ROLLOUTS)
    table = incremental.merge(previous, plan, new_rows, "question_id",
                              [("question_id", "ascending"), ("sample_index", "ascending")], schemas.ROLLOUTS)
    wrote = incremental.commit(table, path, plan)
    for c in computed:
        scratch_path(workspace, c.fingerprint).unlink(missing_ok=True)
    a_full = a_full_by_question(table)
    counts = {**plan.counts, "questions": len(plan.fingerprints), "rows": table.num_rows,
              "resumed": sum(c.cached for c in computed),
              "mean_a_full": sum(a_full.values()) / len(a_full) if a_full else float("nan")}
    return RolloutResult(counts, path, wrote)


def a_full_by_question(table: pa.Table) -> dict[str, float]:
    """question_id -> the teacher's mean accuracy (every row of a question carries it)."""
    return dict(zip(table.column("question_id").to_pylist(), table.column("a_full").to_pylist()))


def load_a_full(workspace: Workspace) -> dict[str, float]:
    path = workspace.table("rollouts")
    if not path.is_file():
        raise FileNotFoundError(f"no rollouts table at {path}: run stage rollout first")
    return a_full_by_question(read_table(path, schemas.ROLLOUTS))


# ------------------------------------------------------------------------------------------ run


def run(config: PipelineConfig, workspace: Workspace, teacher_dir: str | Path, force: bool = False,
        progress: Callable[[int, int], None] | None = None, use_ray: bool = False,
        num_gpus: int | None = None) -> RolloutResult:
    """Plan, compute (here, or one Ray task per shard), commit.

    num_gpus: GPUs per task, already resolved by the caller (the flow calls infra's require_gpus);
    None resolves `compute.gpus_per_task` here against the Ray cluster (use_ray) or this machine,
    failing at once when more are asked for than exist.
    """
    t0 = time.perf_counter()
    if num_gpus is None:
        if use_ray:
            import ray

            resources = ray.cluster_resources()
        else:
            resources = {"GPU": torch.cuda.device_count()}
        num_gpus = resolve_gpus(config.compute.gpus_per_task, resources)
    todo = plan(config, workspace, teacher_dir, force)
    questions, skipped = load_questions(workspace)
    pending = [q for q in questions if q["question_id"] in set(todo.compute)]
    if not pending:
        computed = []
    elif use_ray:
        computed = _compute_on_ray(config, pending, todo.fingerprints, workspace, teacher_dir, num_gpus, progress)
    else:
        computed = compute(config, pending, todo.fingerprints, workspace, teacher_dir, progress, num_gpus)
    result = commit(todo, computed, workspace)
    seconds = time.perf_counter() - t0
    generated = sum(not c.cached for c in computed)
    result.counts.update({f"skipped_{k}": v for k, v in skipped.items()})
    result.counts.update(num_gpus=num_gpus, seconds=round(seconds, 3),
                         questions_per_second=generated / seconds if generated else float("nan"),
                         teacher=checkpoint_hash(teacher_dir))
    return result


def _compute_on_ray(config, pending, fingerprints, workspace, teacher_dir, num_gpus, progress):
    import ray

    shards = [pending[i::config.compute.max_shards] for i in range(config.compute.max_shards)]
    task = ray.remote(compute).options(num_gpus=num_gpus, num_cpus=config.compute.cpus_per_task, max_retries=0)
    refs = [task.remote(config, shard, fingerprints, workspace, str(teacher_dir), None, num_gpus)
            for shard in shards if shard]
    out, done = [], 0
    while refs:
        ready, refs = ray.wait(refs)
        for items in ray.get(ready):
            out += items
            done += len(items)
            if progress:
                progress(done, len(pending))
    return out
