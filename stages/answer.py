"""`marc answer`: one question about one video file, answered by the trained student (issue #7).

    remember  the video's events and their vectors, once per video (by content hash): segment and
              embed through the stages' own code into the answer workspace MARC_HOME/answer
              (videos + events tables, LanceDB event_vectors), kept for the next question
    retrieve  the question's top-k events of that video (exact search), sampled at retrieve.fps
    features  vision-tower output of each retrieved event, computed once per (event, frames, student)
              and stored under MARC_HOME/answer/features/<student hash>/: the tower sees one temporal
              group at a time, so an event's features do not depend on the other events of a memory
    answer    compress (memory-aware, N_target groups) -> language model -> greedy completion

A later question about a known video costs retrieval, compression and the language model only (plus
reading cached features). This module never touches MLflow: the caller resolves the model folder.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import torch

from data_contracts import schemas
from data_contracts.config import PipelineConfig
from stages import ingest
from stages.common.arrow_io import read_table, write_tables
from stages.common.media import ProbeError
from stages.common.workspace import Workspace
from stages.embed import stage as embed
from stages.model import runner
from stages.model.inputs import Memory, build_student_inputs, load_frames
from stages.model.qwen import ModelBundle, load_model
from stages.retrieve.stage import query_text, sample_memory
from stages.train.rewards import extract_answer

LETTER = re.compile(r"^\s*([A-Z])[.)]")


@dataclass
class Answer:
    answer: str  # what <answer>…</answer> held (the option letter for a multiple-choice question)
    option: str | None  # the full option text of that letter, when options were given
    completion: str  # the student's whole completion (<think>…</think><answer>…</answer>)
    events: list[dict]  # retrieved events, chronological: event_index, start_time, end_time, score, rank
    visual_tokens: int  # LM placeholder tokens the student saw
    seconds: dict[str, float] = field(default_factory=dict)  # remember / retrieve / features / answer / total
    new_video: bool = False  # the video's memory was built by this call
    cached_events: int = 0  # retrieved events whose vision features were read back


class AnswerError(ValueError):
    """A clear, user-facing reason why a question cannot be answered (bad file, no model)."""


def answer_workspace(home: Path) -> Workspace:
    return Workspace(Path(home) / "answer")


# ------------------------------------------------------------------------------------------ remember


def remember(config: PipelineConfig, workspace: Workspace, video: Path, tower_checkpoint: Path | None,
             towers=None) -> tuple[dict, bool]:
    """The video's row in the answer workspace (video_id = content hash); builds its memory if new."""
    video = Path(video).expanduser().resolve()
    if not video.is_file():
        raise AnswerError(f"no such video file: {video}")
    try:
        row, _ = ingest.media_row(video, "pending", "video", config.ingest.max_decode_probe_frames)
    except ProbeError as exc:
        raise AnswerError(f"{video} is not a readable video: {exc}") from exc
    row["video_id"] = f"{row['content_sha256'][:16]}/{video.name}"
    videos_path = workspace.table("videos")
    known = read_table(videos_path, schemas.VIDEOS).to_pylist() if videos_path.is_file() else []
    same = next((v for v in known if v["content_sha256"] == row["content_sha256"]), None)
    table = embed.open_table(workspace)
    if same is not None and table is not None and embed.scan(
            table, ["event_key"], f"video_id = {embed._sql_str(same['video_id'])}").num_rows:
        return same, False
    if same is None:
        known.append(row)
    else:
        row = same
    videos = pa.Table.from_pylist(known, schema=schemas.VIDEOS)
    write_tables([(videos, videos_path)])
    from stages.segment import stage as segment

    segmented = segment.run(config, videos, workspace)
    events = read_table(segmented.events_path, schemas.EVENTS)
    if not any(e == row["video_id"] for e in events.column("video_id").to_pylist()):
        raise AnswerError(f"{video}: no events could be read from it (see `marc show rejects`)")
    if tower_checkpoint is None and not config.embed.clip_checkpoint:
        raise AnswerError("no trained visual tower to embed the video's events: run the pipeline first "
                          "(`marc run`), or set embed.clip_checkpoint")
    embed.run(config, events, videos, workspace, tower_checkpoint, towers=towers)
    return row, True


# ------------------------------------------------------------------------------------------ retrieve


def retrieve(config: PipelineConfig, workspace: Workspace, video: dict, question: str, options: list[str] | None,
             text_tower) -> tuple[Memory, list[dict]]:
    """The question's memory (frames per retrieved event) and the events, chronological."""
    cfg = config.retrieve
    vector = text_tower.encode_text([query_text(question, options or [], cfg.query_with_options)])[0]
    hits = embed.search_events(embed.open_table(workspace), vector, cfg.top_k, config, video_id=video["video_id"])
    for rank, h in enumerate(hits):
        h["rank"] = rank
    hits.sort(key=lambda h: h["event_index"])
    times, counts, _ = sample_memory(hits, cfg.fps, cfg.max_frames)
    return Memory(times, counts), hits


# ------------------------------------------------------------------------------------------ features


def student_key(student_dir: Path) -> str:
    """The feature cache's name for a student folder: its files' names, sizes and mtimes. Hashing the
    weights' bytes (rollout's checkpoint_hash) would cost seconds per `marc answer` on a real checkpoint,
    as every call is a new process; a rewritten folder gets new mtimes, so a new key."""
    files = sorted(p for p in Path(student_dir).resolve().rglob("*") if p.is_file())
    stamp = [(str(p.relative_to(Path(student_dir).resolve())), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(repr(stamp).encode()).hexdigest()[:24]


def _feature_path(workspace: Workspace, student: str, video: dict, stamps: list[float]) -> Path:
    key = hashlib.sha256(f"{video['content_sha256']}:{[round(t, 4) for t in stamps]}".encode()).hexdigest()[:32]
    return workspace.home / "features" / student / f"{key}.pt"


def event_features(bundle: ModelBundle, workspace: Workspace, student: str, video: dict, question: dict,
                   memory: Memory) -> tuple[list[torch.Tensor], int]:
    """Vision-tower features of each event of the memory ([groups_e * P, D] each), and how many were cached."""
    out, cached, start = [], 0, 0
    cache = workspace.home / "cache" / "frames"
    for n in memory.event_frames:
        stamps = memory.timestamps[start:start + n]
        start += n
        path = _feature_path(workspace, student, video, stamps)
        if path.is_file():
            out.append(torch.load(path, weights_only=True))
            cached += 1
            continue
        frames = load_frames(bundle, video["path"], stamps, cache, video["content_sha256"])
        one = build_student_inputs(bundle, [question], [frames], [Memory(stamps, [n])], "identity")
        with torch.no_grad():
            features = runner.vision_tower(bundle, one)[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(features, tmp)
        tmp.replace(path)
        out.append(features)
    return out, cached


# ------------------------------------------------------------------------------------------ answer


def answer(config: PipelineConfig, home: Path, video: Path, question: str, options: list[str] | None,
           student_dir: Path, tower_checkpoint: Path | None, bundle: ModelBundle | None = None,
           text_tower=None, new_tokens: int | None = None) -> Answer:
    """Answer one question about one video (see the module docstring). new_tokens: decode exactly that
    many tokens (benchmarks compare arms at equal length) instead of stopping at the end of the answer."""
    if not (Path(student_dir) / "marc_model.json").is_file():
        raise AnswerError(f"no trained student at {student_dir}: run the pipeline first (`marc run`)")
    if not question.strip():
        raise AnswerError("the question is empty")
    for k, opt in enumerate(options or []):
        if not LETTER.match(opt):
            raise AnswerError(f"option {k + 1} {opt!r} does not start with a letter like 'A.'")
    t0 = time.perf_counter()
    workspace = answer_workspace(home)
    row, new = remember(config, workspace, video, tower_checkpoint)
    t1 = time.perf_counter()
    if text_tower is None:
        from stages.embed.towers import TextTower, load_towers

        text_tower = load_towers(config.embed, None) if config.embed.clip_checkpoint else TextTower()
    memory, hits = retrieve(config, workspace, row, question, options, text_tower)
    t2 = time.perf_counter()
    bundle = bundle or load_model(student_dir, config.model)
    q = {"question_id": "answer", "problem": question, "options": list(options or []),
         "problem_type": "multiple choice" if options else "free-form"}
    features, cached = event_features(bundle, workspace, student_key(student_dir), row, q, memory)
    t3 = time.perf_counter()
    # The builder gives the prompt and the M-RoPE grid; the frames come from the frame cache (the
    # patches it makes of them are not run again: the features are given).
    frames = load_frames(bundle, row["path"], memory.timestamps, workspace.home / "cache" / "frames",
                         row["content_sha256"])
    inputs = build_student_inputs(bundle, [q], [frames], [memory], "memory")
    with torch.no_grad():
        embeds = runner.compress_features(bundle, inputs, [torch.cat(features)])
        gen = runner.generate(bundle, inputs, new_tokens or config.evaluate.max_new_tokens, embeds=embeds,
                              min_new_tokens=new_tokens)
    t4 = time.perf_counter()
    text = gen.texts[0]
    said = extract_answer(text)
    option = next((o for o in options or [] if LETTER.match(o).group(1) == said.strip().upper()[:1]), None)
    events = [{k: h[k] for k in ("event_index", "start_time", "end_time", "score", "rank")} for h in hits]
    return Answer(said, option, text, events, inputs.visual_tokens[0],
                  {"remember": t1 - t0, "retrieve": t2 - t1, "features": t3 - t2, "answer": t4 - t3, "total": t4 - t0},
                  new, cached)
