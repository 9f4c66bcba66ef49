"""Stage retrieve: questions -> episodic memories (the memories table), per-question incremental.

For each video question: embed the question text (without the option letters), search that
video's events in `event_vectors` (exactly: see `stages.embed.stage.search_events`), keep the
top-k, put them back in chronological order, and sample each at `fps` (at most `max_frames` in
all). The frames are decoded once here into the shared frame cache at the size the model room
asks for (`model.frame_size`), so rollout, training and evaluation read them back instead of
decoding again. The memory records the frame timestamps and how many of them belong to each
event (the boundaries the compression layer merges within).

    plan    which questions changed (their text, their video's vectors, the config), which vanished
    compute retrieve + sample (a shard; touches no table), and fill the frame cache
    commit  reused rows + computed rows -> memories table (atomic), and recall per family
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

from data_contracts import schemas
from data_contracts.config import PipelineConfig
from stages.common import incremental
from stages.common.frames import decode_frames, uniform_timestamps
from stages.common.workspace import Workspace
from stages.embed import stage as embed_stage
from stages.embed.train import frame_cache, load_ground_truth
from stages.retrieve.metrics import answer_event_map, recall_by_family

STAGE = "retrieve"
CODE_VERSION = "1"
_LETTER = re.compile(r"^\s*[A-Z][.)]\s*")


@dataclass
class RetrieveResult:
    counts: dict[str, int]  # computed/reused/removed questions, memories, frames, no_events
    memories_path: Path
    wrote: bool
    recall: dict[str, dict] = field(default_factory=dict)  # family -> {questions, recall@1, recall@k}; test split


def query_text(problem: str, options: list[str], with_options: bool = False) -> str:
    """The text embedded for a question: the question alone, or followed by the option texts (letters stripped)."""
    if not with_options or not options:
        return problem.strip()
    return " ".join([problem.strip(), *(_LETTER.sub("", o).strip() for o in options)])


def allocate_frames(durations: list[float], fps: float, max_frames: int) -> list[int]:
    """Frames per event: round(duration * fps), at least 1 each; scaled down to max_frames in all if over.

    Scaling keeps every event at least one frame and gives the leftover to the longest events.
    """
    want = [max(1, int(round(d * fps))) for d in durations]
    if sum(want) <= max_frames:
        return want
    if len(want) > max_frames:
        raise ValueError(f"{len(want)} events cannot each get a frame within max_frames={max_frames}")
    share = [max(1, int(max_frames * w / sum(want))) for w in want]
    order = sorted(range(len(want)), key=lambda i: -want[i])
    i = 0
    while sum(share) != max_frames:  # fix rounding: add to (or take from) the longest events first
        j = order[i % len(order)]
        if sum(share) < max_frames:
            share[j] += 1
        elif share[j] > 1:
            share[j] -= 1
        i += 1
    return share


def sample_memory(events: list[dict], fps: float, max_frames: int) -> tuple[list[float], list[int], bool]:
    """Timestamps of the clip (event after event, slice centres), frames per event, and whether it was padded.

    An odd total is made even by repeating the last frame (once): Qwen2.5-VL pairs frames into
    temporal groups and its own processor pads a video the same way, and no event loses a frame.
    max_frames is even, so the padded total never exceeds it.
    """
    counts = allocate_frames([e["end_time"] - e["start_time"] for e in events], fps, max_frames)
    times = [t for e, n in zip(events, counts)
             for t in uniform_timestamps(e["start_time"], e["end_time"] - e["start_time"], n)]
    padded = len(times) % 2 == 1
    if padded:
        times.append(times[-1])
        counts[-1] += 1
    return times, counts, padded


def config_fields(config: PipelineConfig) -> dict:
    """Retrieval settings, the query-side tower and the size of the cached frames."""
    return {**config.retrieve.model_dump(), "text_model": config.embed.text_model,
            "clip_checkpoint": config.embed.clip_checkpoint, "frame_size": config.model.frame_size}


def plan(config: PipelineConfig, questions: pa.Table, videos: dict[str, dict], vector_fps: dict[str, str],
         workspace: Workspace, force: bool = False) -> incremental.Plan:
    fields = config_fields(config)
    current = {}
    for q in questions.to_pylist():
        if q["data_type"] != "video" or q["video_id"] not in videos:
            continue
        inputs = [q["problem"], *q["options"], q["video_id"], videos[q["video_id"]]["content_sha256"],
                  vector_fps.get(q["video_id"], "")]
        current[q["question_id"]] = incremental.fingerprint(STAGE, CODE_VERSION, fields, inputs)
    previous = incremental.load_previous(workspace.table("memories"), schemas.MEMORIES)
    return incremental.plan_items(current, previous, force)


def compute(config: PipelineConfig, towers, questions: list[dict], videos: dict[str, dict], table,
            fingerprints: dict[str, str], workspace: Workspace,
            progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Memories rows of the given questions; decodes (and caches) every frame they name."""
    cfg = config.retrieve
    texts = [query_text(q["problem"], q["options"], cfg.query_with_options) for q in questions]
    vectors = towers.encode_text(texts) if questions else []
    rows: list[dict] = []
    wanted: dict[str, set[float]] = {}
    for i, (q, text, vector) in enumerate(zip(questions, texts, vectors), start=1):
        hits = embed_stage.search_events(table, vector, cfg.top_k, config, video_id=q["video_id"]) if table else []
        if hits:
            for rank, h in enumerate(hits):
                h["rank"] = rank
            hits.sort(key=lambda h: h["event_index"])  # chronological
            times, counts, padded = sample_memory(hits, cfg.fps, cfg.max_frames)
            video = videos[q["video_id"]]
            wanted.setdefault(q["video_id"], set()).update(times)
            rows.append(dict(
                question_id=q["question_id"], video_id=q["video_id"], video_path=video["path"],
                video_sha256=video["content_sha256"], query=text,
                event_keys=[h["event_key"] for h in hits], event_indices=[h["event_index"] for h in hits],
                scores=[h["score"] for h in hits], ranks=[h["rank"] for h in hits],
                event_start_times=[h["start_time"] for h in hits], event_end_times=[h["end_time"] for h in hits],
                event_frame_counts=counts, frame_timestamps=times, frame_size=config.model.frame_size,
                padded=padded, fingerprint=fingerprints[q["question_id"]],
            ))
        if progress:
            progress(i, len(questions))
    for vid, times in sorted(wanted.items()):  # one decode pass per video fills the cache for all its questions
        video = videos[vid]
        decode_frames(Path(video["path"]), sorted(times), config.model.frame_size, frame_cache(workspace),
                      video["content_sha256"])
    return rows


def commit(todo: incremental.Plan, rows: list[dict], workspace: Workspace) -> tuple[pa.Table, bool]:
    path = workspace.table("memories")
    previous = incremental.load_previous(path, schemas.MEMORIES)
    new = pa.Table.from_pylist(rows, schema=schemas.MEMORIES)
    table = incremental.merge(previous, todo, new, "question_id", [("question_id", "ascending")], schemas.MEMORIES)
    return table, incremental.commit(table, path, todo)


def run(config: PipelineConfig, questions: pa.Table, videos: pa.Table, workspace: Workspace,
        ground_truth: Path | None = None, force: bool = False, towers=None,
        progress: Callable[[int, int], None] | None = None) -> RetrieveResult:
    """Memories for every video question; recall per family on the test split when ground truth is given.

    Reads the event_vectors table that stage embed wrote in the same workspace. The query side is
    MiniLM (frozen, needs no checkpoint) or the CLIP/SigLIP text tower the config names.
    """
    from stages.embed.towers import TextTower, load_towers

    video_rows = {v["video_id"]: v for v in videos.to_pylist()}
    table = embed_stage.open_table(workspace)
    vector_fps = embed_stage.stored_fingerprints(table)
    todo = plan(config, questions, video_rows, vector_fps, workspace, force)
    by_id = {q["question_id"]: q for q in questions.to_pylist()}
    rows: list[dict] = []
    if todo.compute:
        if towers is None:  # MiniLM needs no visual tower to embed a question
            towers = load_towers(config.embed, None) if config.embed.clip_checkpoint else TextTower()
        rows = compute(config, towers, [by_id[q] for q in todo.compute], video_rows, table, todo.fingerprints,
                       workspace, progress)
    memories, wrote = commit(todo, rows, workspace)
    counts = {**todo.counts, "memories": memories.num_rows,
              "no_events": len(todo.compute) - len(rows),
              "frames": sum(len(t) for t in memories.column("frame_timestamps").to_pylist())}
    result = RetrieveResult(counts, workspace.table("memories"), wrote)
    if ground_truth and Path(ground_truth).is_file() and table is not None:
        result.recall = evaluate(config, memories, questions, table, load_ground_truth(ground_truth))
        for family, r in result.recall.items():
            print(f"retrieve: {family:<10} " + " ".join(f"{k}={v}" for k, v in r.items()))
    return result


def evaluate(config: PipelineConfig, memories: pa.Table, questions: pa.Table, table, truth: dict) -> dict:
    """Recall@1 / recall@k per family on the test split, answer events mapped to detected ones by overlap."""
    detected: dict[str, list[dict]] = {}
    for r in embed_stage.scan(table, ["video_id", "event_index", "start_time", "end_time"]).to_pylist():
        detected.setdefault(r["video_id"], []).append(r)
    mapping = answer_event_map(truth, detected)
    return recall_by_family(memories.to_pylist(), questions.to_pylist(), mapping, config.retrieve.top_k)
