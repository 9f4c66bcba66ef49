"""Stage embed: events -> vectors in the LanceDB table `event_vectors`, per-video incremental.

    plan    which videos' events changed (segment fingerprint, tower checkpoint, captions), which vanished
    compute decode `frames_per_event` frames of each event (cached) and run the visual tower (a shard)
    commit  one `merge_insert` on event_key: upsert the computed videos' rows and delete rows of
            vanished videos and vanished events, as one new table version; nothing to do -> no write

The per-video fingerprints live in the rows themselves (`fingerprint` column): LanceDB has no
per-table metadata that a `merge_insert` updates atomically with the rows.

`search_events` is the one place that decides how the table is queried: restricted to one
video it is always exact (fast with the BTREE on video_id, and an IVF index would miss events
in unprobed partitions); across videos it uses the ANN index, when there is one, with
`nprobes` and `refine_factor`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from data_contracts import schemas
from data_contracts.config import PipelineConfig
from stages.common import incremental
from stages.common.frames import decode_frames, uniform_timestamps
from stages.common.workspace import Workspace
from stages.embed.train import checkpoint_hash, frame_cache, load_ground_truth, match_events

STAGE = "embed"
CODE_VERSION = "1"
TABLE = "event_vectors"


@dataclass
class VideoVectors:
    video_id: str
    fingerprint: str
    rows: list[dict] = field(default_factory=list)


@dataclass
class EmbedResult:
    counts: dict[str, int]  # computed/reused/removed videos, rows, upserted, deleted, events
    db_path: Path  # the LanceDB folder (MARC_HOME/lancedb)
    table: str  # "event_vectors"
    wrote: bool  # False: the table version did not change
    version: int | None  # table version after the commit
    metrics: dict = field(default_factory=dict)  # events_per_second, embed_seconds


def db_path(workspace: Workspace) -> Path:
    return workspace.home / "lancedb"


def connect(workspace: Workspace):
    import lancedb

    path = db_path(workspace)
    path.mkdir(parents=True, exist_ok=True)
    return lancedb.connect(str(path))


def open_table(workspace: Workspace):
    """The event_vectors table, or None before the first commit."""
    db = connect(workspace)
    return db.open_table(TABLE) if TABLE in db.list_tables().tables else None


def stored_fingerprints(table) -> dict[str, str]:
    """video_id -> embed fingerprint, read from the rows."""
    if table is None:
        return {}
    rows = scan(table, ["video_id", "fingerprint"]).to_pylist()
    return {r["video_id"]: r["fingerprint"] for r in rows}


def scan(table, columns: list[str], where: str | None = None) -> pa.Table:
    """Some columns of every row (matching `where`), without reading the vectors."""
    query = table.search().select(columns).limit(None)
    return (query.where(where) if where else query).to_arrow()


def config_fields(config: PipelineConfig) -> dict:
    """What changes a vector: the towers and how frames are picked (not the index settings)."""
    e = config.embed
    return dict(clip_checkpoint=e.clip_checkpoint, frames_per_event=e.frames_per_event, frame_size=e.frame_size)


def video_captions(events: list[dict], truth: dict | None) -> list[str | None]:
    """Caption of the ground-truth event each detected event overlaps most, when events.jsonl is known."""
    if not truth or events[0]["video_id"] not in truth:
        return [None] * len(events)
    gt = truth[events[0]["video_id"]]["events"]
    best = match_events([(e["start_time"], e["end_time"]) for e in events],
                        [(g["start_time"], g["end_time"]) for g in gt], per="detected")
    return [gt[j]["caption"] if j is not None else None for j in best]


def plan(config: PipelineConfig, events: pa.Table, workspace: Workspace, ckpt_hash: str,
         truth: dict | None = None, force: bool = False) -> tuple[incremental.Plan, dict[str, list[dict]]]:
    """The per-video plan, and the events of every current video (chronological)."""
    by_video: dict[str, list[dict]] = {}
    for e in sorted(events.to_pylist(), key=lambda e: (e["video_id"], e["event_index"])):
        by_video.setdefault(e["video_id"], []).append(e)
    fields = config_fields(config)
    current = {}
    for vid, rows in by_video.items():
        captions = video_captions(rows, truth)
        for row, caption in zip(rows, captions):
            row["caption"] = caption
        current[vid] = incremental.fingerprint(STAGE, CODE_VERSION, fields,
                                               [rows[0]["fingerprint"], ckpt_hash, json.dumps(captions)])
    previous = stored_fingerprints(open_table(workspace))
    todo = incremental.Plan(fingerprints=current, previous=previous)
    for vid, fp in sorted(current.items()):
        (todo.reuse if not force and previous.get(vid) == fp else todo.compute).append(vid)
    todo.remove = sorted(set(previous) - set(current))
    return todo, by_video


def compute(config: PipelineConfig, towers, events_by_video: dict[str, list[dict]], videos: dict[str, dict],
            fingerprints: dict[str, str], workspace: Workspace,
            progress: Callable[[int, int], None] | None = None) -> tuple[list[VideoVectors], float]:
    """Vectors of the given videos' events; returns them and the seconds spent (decode + tower)."""
    cfg = config.embed
    size = getattr(towers, "size", cfg.frame_size) if cfg.clip_checkpoint else cfg.frame_size
    out: list[VideoVectors] = []
    t0 = time.perf_counter()
    for i, (vid, rows) in enumerate(sorted(events_by_video.items()), start=1):
        item = VideoVectors(vid, fingerprints[vid])
        video = videos[vid]
        times = [t for e in rows for t in uniform_timestamps(e["start_time"], e["end_time"] - e["start_time"],
                                                             cfg.frames_per_event)]
        frames = decode_frames(Path(video["path"]), times, size, frame_cache(workspace), video["content_sha256"])
        vectors = towers.encode_events(frames.reshape(len(rows), cfg.frames_per_event, *frames.shape[1:]))
        for e, v in zip(rows, vectors):
            item.rows.append(dict(event_key=e["event_key"], video_id=vid, event_index=e["event_index"],
                                  start_time=e["start_time"], end_time=e["end_time"], vector=v.astype(np.float32),
                                  caption=e.get("caption"), fingerprint=item.fingerprint))
        out.append(item)
        if progress:
            progress(i, len(events_by_video))
    return out, time.perf_counter() - t0


def commit(config: PipelineConfig, todo: incremental.Plan, computed: list[VideoVectors],
           workspace: Workspace) -> EmbedResult:
    rows = [r for c in computed for r in c.rows]
    table = open_table(workspace)
    dim = len(rows[0]["vector"]) if rows else None
    schema = schemas.event_vectors_schema(dim or schemas.EMBED_DIM)
    wrote = False
    if table is not None and dim and table.schema.field("vector").type.list_size != dim:
        connect(workspace).drop_table(TABLE)  # another tower with another width: every video was recomputed
        table = None
    touched = sorted(set(todo.compute) | set(todo.remove))
    condition = "video_id IN (" + ", ".join(_sql_str(v) for v in touched) + ")"
    old_keys = set() if table is None or not touched else set(
        scan(table, ["event_key"], condition).column("event_key").to_pylist())
    new_keys = {r["event_key"] for r in rows}
    if table is None and rows:
        table = connect(workspace).create_table(TABLE, pa.Table.from_pylist(rows, schema=schema))
        wrote = True
    elif table is not None and touched:
        before = table.version
        if rows:
            # One merge_insert = one version: upsert the new rows, and drop rows of the touched videos that
            # are not in the new data (vanished videos, and events a re-segmented video no longer has).
            (table.merge_insert("event_key").when_matched_update_all().when_not_matched_insert_all()
             .when_not_matched_by_source_delete(condition).execute(pa.Table.from_pylist(rows, schema=schema)))
        elif old_keys:
            table.delete(condition)
        wrote = table.version != before
    if wrote:
        _maintain_indexes(table, config)
    total = table.count_rows() if table is not None else 0
    counts = {**todo.counts, "videos": len(todo.fingerprints), "rows": total, "inserted": len(new_keys - old_keys),
              "updated": len(new_keys & old_keys), "deleted": len(old_keys - new_keys)}
    return EmbedResult(counts, db_path(workspace), TABLE, wrote, table.version if table is not None else None)


def run(config: PipelineConfig, events: pa.Table, videos: pa.Table, workspace: Workspace, checkpoint: Path | None,
        ground_truth: Path | None = None, force: bool = False, towers=None,
        progress: Callable[[int, int], None] | None = None) -> EmbedResult:
    """Embed every event; prints and returns the throughput (events/s) of what it computed."""
    from stages.embed.towers import load_towers

    source = Path(config.embed.clip_checkpoint) if config.embed.clip_checkpoint else checkpoint
    if source is None:
        raise ValueError("stage embed needs the checkpoint folder that embed-train returned")
    truth = load_ground_truth(ground_truth) if ground_truth and Path(ground_truth).is_file() else None
    todo, by_video = plan(config, events, workspace, checkpoint_hash(source), truth, force)
    computed, seconds = [], 0.0
    if todo.compute:
        towers = towers or load_towers(config.embed, checkpoint)
        video_rows = {v["video_id"]: v for v in videos.to_pylist()}
        computed, seconds = compute(config, towers, {v: by_video[v] for v in todo.compute}, video_rows,
                                    todo.fingerprints, workspace, progress)
    result = commit(config, todo, computed, workspace)
    n = sum(len(c.rows) for c in computed)
    result.counts["events"] = n
    result.metrics = {"embed_seconds": round(seconds, 3),
                      "events_per_second": round(n / seconds, 1) if seconds else None}
    print(f"embed: {n} events of {len(computed)} videos in {seconds:.2f} s = "
          f"{(n / seconds if seconds else 0):.1f} events/s; reused {len(todo.reuse)} videos, "
          f"removed {len(todo.remove)}; table version {result.version} ({'written' if result.wrote else 'unchanged'})")
    return result


def _maintain_indexes(table, config: PipelineConfig) -> None:
    """At index_min_rows rows and up: build the ANN index and the video_id BTREE once, then fold new rows in."""
    cfg = config.embed
    rows = table.count_rows()
    if rows < cfg.index_min_rows:
        return
    names = {tuple(i.columns): i for i in table.list_indices()}
    if ("vector",) not in names:
        create_vector_index(table, cfg)
        table.create_index("video_id", config=_btree())
    else:
        table.optimize()  # adds the new rows to the existing indexes


def create_vector_index(table, cfg) -> None:
    from lancedb import index

    kind = {"IVF_SQ": index.IvfSq, "IVF_PQ": index.IvfPq, "IVF_FLAT": index.IvfFlat,
            "IVF_HNSW_SQ": index.IvfHnswSq}[cfg.index_type]
    table.create_index("vector", config=kind(distance_type="cosine", num_partitions=cfg.num_partitions), replace=True)


def _btree():
    from lancedb.index import BTree

    return BTree()


def search_events(table, query: np.ndarray, k: int, config: PipelineConfig, video_id: str | None = None,
                  columns: tuple[str, ...] = ("event_key", "video_id", "event_index", "start_time", "end_time")
                  ) -> list[dict]:
    """Top-k events by cosine similarity (`score`), best first; exact within one video, ANN across videos."""
    cfg = config.embed
    q = table.search(np.asarray(query, dtype=np.float32), vector_column_name="vector").distance_type("cosine")
    q = q.select([*columns, "_distance"]).limit(k)
    if video_id is not None:
        q = q.where(f"video_id = {_sql_str(video_id)}", prefilter=True).bypass_vector_index()
    elif any(tuple(i.columns) == ("vector",) for i in table.list_indices()):
        q = q.nprobes(cfg.nprobes).refine_factor(cfg.refine_factor)
    hits = q.to_arrow().to_pylist()
    for h in hits:
        h["score"] = 1.0 - float(h.pop("_distance"))
    return hits


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
