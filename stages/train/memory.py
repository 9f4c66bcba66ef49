"""The student's episodic memory of a question: the one place that decides where it comes from.

    memories = load_memories(workspace, config.retrieve)   # once per stage run (driver side)
    memory = student_memory(question, memories)             # Memory(timestamps, event_frames)

Sources, in order:
  1. `retrieved`: the retrieve stage's `memories` table (`workspace.table("memories")`, issue #4) when
     it exists: per question the sampled frame timestamps and the frames of each retrieved event.
  2. `ground_truth`: until then, `ground_truth_memory` over the data folder's `events.jsonl` (the answer
     event and its neighbours, `top_k` events at `fps`, at most `max_frames` frames). The data folder is
     found from the videos table (a video's absolute `path` minus its relative `video_id`).

`MemoryTables.source` says which one a run used (stages report it in their counts) and
`MemoryTables.fingerprint` is what downstream fingerprints hash, so a new memories table (or changed
ground-truth events) retrains the student.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from data_contracts.config import RetrieveConfig
from stages.common.arrow_io import read_table
from stages.common.workspace import Workspace
from stages.model.inputs import Memory, ground_truth_memory

# Column names accepted in the memories table (its schema lands with the retrieve stage, #4).
_TIMESTAMPS = ("timestamps", "frame_timestamps", "sampled_timestamps")
_EVENT_FRAMES = ("event_frames", "event_frame_counts", "frames_per_event")
_EVENT_STARTS = ("event_boundaries", "event_starts", "event_start_frames")  # first sampled-frame index per event


@dataclass
class MemoryTables:
    """Everything `student_memory` needs, loaded once; small and picklable (it travels to Ray workers)."""

    source: str  # "retrieved" (memories table) | "ground_truth" (events.jsonl)
    fingerprint: str  # hash of what the memories are made from
    retrieved: dict[str, Memory] = field(default_factory=dict)  # question_id -> memory (source "retrieved")
    events: dict[str, list[dict]] = field(default_factory=dict)  # video_id -> ground-truth events
    top_k: int = 3
    fps: float = 1.0
    max_frames: int = 64


def student_memory(question: dict, memories: MemoryTables) -> Memory:
    """The compressed arm's input frames of one question (timestamps on the video's clock, per event)."""
    qid = question["question_id"]
    if memories.source == "retrieved":
        if qid not in memories.retrieved:
            raise KeyError(f"question {qid} has no row in the memories table: rerun stage retrieve")
        return memories.retrieved[qid]
    events = memories.events.get(question["video_id"])
    if events is None:
        raise KeyError(f"video {question['video_id']} (question {qid}) is not in events.jsonl")
    if question.get("answer_event") is None:
        raise ValueError(f"question {qid} has no answer_event, so no ground-truth memory; "
                         "run stage retrieve to get a memories table")
    return ground_truth_memory(events, int(question["answer_event"]), memories.top_k, memories.fps,
                               memories.max_frames)


def load_memories(workspace: Workspace, retrieve: RetrieveConfig) -> MemoryTables:
    """The memories table when retrieve has written one, else ground-truth events from the data folder."""
    table_path = workspace.table("memories")
    if table_path.is_file():
        return _from_table(table_path)
    data_dir = data_folder(workspace)
    events_file = data_dir / "events.jsonl"
    if not events_file.is_file():
        raise FileNotFoundError(f"no memories table at {table_path} and no ground-truth {events_file}: "
                                "run stage retrieve first")
    raw = events_file.read_bytes()
    events = {}
    for line in raw.decode().splitlines():
        if line.strip():
            row = json.loads(line)
            events[row["path"]] = row["events"]  # the relative path: the videos table's video_id
    fp = hashlib.sha256(raw + json.dumps(retrieve.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:24]
    return MemoryTables("ground_truth", fp, events=events, top_k=retrieve.top_k, fps=retrieve.fps,
                        max_frames=retrieve.max_frames)


def data_folder(workspace: Workspace) -> Path:
    """The data folder ingest read: a video's absolute path minus its relative video_id."""
    path = workspace.table("videos")
    if not path.is_file():
        raise FileNotFoundError(f"no videos table at {path}: run stage ingest first")
    for row in read_table(path).select(["video_id", "path"]).to_pylist():
        parts = PurePosixPath(row["video_id"]).parts
        return Path(row["path"]).parents[len(parts) - 1]
    raise ValueError(f"the videos table {path} is empty")


def _from_table(path: Path) -> MemoryTables:
    table = read_table(path)
    names = set(table.column_names)

    def pick(options: tuple[str, ...]) -> str | None:
        return next((c for c in options if c in names), None)

    ts_col, counts_col, starts_col = pick(_TIMESTAMPS), pick(_EVENT_FRAMES), pick(_EVENT_STARTS)
    if "question_id" not in names or ts_col is None or (counts_col is None and starts_col is None):
        raise ValueError(f"{path}: a memories table needs question_id, one of {_TIMESTAMPS} and one of "
                         f"{_EVENT_FRAMES + _EVENT_STARTS}; it has {sorted(names)}")
    retrieved = {}
    for row in table.to_pylist():
        stamps = [float(t) for t in row[ts_col]]
        if counts_col is not None:
            counts = [int(n) for n in row[counts_col]]
        else:
            starts = [int(s) for s in row[starts_col]] + [len(stamps)]
            counts = [b - a for a, b in zip(starts, starts[1:])]
        retrieved[row["question_id"]] = Memory(stamps, counts)
    items = (table.schema.metadata or {}).get(b"marc.items")
    fp = hashlib.sha256(items if items else path.read_bytes()).hexdigest()[:24]
    return MemoryTables("retrieved", fp, retrieved=retrieved)
