"""Stage segment: videos table -> events table (+ keyframes), per-video incremental.

    plan    which videos changed since the last run (fingerprints), which vanished
    compute detect the events of some videos (a shard; runs anywhere, touches no table)
    commit  reused rows + computed rows -> events table and segment's rejects, atomically

`run` does all three in one process; the flow runs `compute` per shard as Ray tasks.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa

from data_contracts import schemas
from data_contracts.config import PipelineConfig
from stages.common import incremental
from stages.common.arrow_io import read_table
from stages.common.workspace import Workspace
from stages.segment.detect import UndecodableVideo, detect_events

STAGE = "segment"
CODE_VERSION = "1"


@dataclass
class VideoEvents:
    """What compute produced for one video: its event rows and its rejects rows."""

    video_id: str
    fingerprint: str
    events: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)


@dataclass
class SegmentResult:
    counts: dict[str, int]
    events_path: Path
    wrote: bool


def config_fields(config: PipelineConfig) -> dict:
    """The config this stage reads: a change to any of it re-segments every video."""
    return config.segment.model_dump()


def load_inputs(workspace: Workspace) -> pa.Table:
    """The videos table written by ingest."""
    path = workspace.table("videos")
    if not path.is_file():
        raise FileNotFoundError(f"no videos table at {path}: run stage ingest first")
    return read_table(path, schemas.VIDEOS)


def plan(config: PipelineConfig, videos: pa.Table, workspace: Workspace, force: bool = False) -> incremental.Plan:
    fields = config_fields(config)
    current = {
        v["video_id"]: incremental.fingerprint(STAGE, CODE_VERSION, fields, [v["content_sha256"]])
        for v in videos.to_pylist() if v["media_type"] == "video"
    }
    previous = incremental.load_previous(workspace.table("events"), schemas.EVENTS)
    return incremental.plan_items(current, previous, force)


def keyframe_dir(workspace: Workspace, video_id: str, fingerprint: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", video_id)[-60:] + "-" + hashlib.sha1(video_id.encode()).hexdigest()[:8]
    return workspace.keyframes / STAGE / safe / fingerprint


def compute(config: PipelineConfig, videos: list[dict], fingerprints: dict[str, str], workspace: Workspace,
            progress: Callable[[int, int], None] | None = None) -> list[VideoEvents]:
    cfg = config.segment
    out: list[VideoEvents] = []
    for i, video in enumerate(videos, start=1):
        vid, fp = video["video_id"], fingerprints[video["video_id"]]
        item = VideoEvents(vid, fp)
        frames_dir = keyframe_dir(workspace, vid, fp)
        try:
            result = detect_events(
                Path(video["path"]), detector=cfg.detector, detector_params=dict(cfg.detector_params),
                auto_downscale=cfg.auto_downscale, min_event_seconds=cfg.min_event_seconds,
                max_event_seconds=cfg.max_event_seconds, keyframes_per_event=cfg.keyframes_per_event,
                keyframe_dir=frames_dir,
            )
        except (UndecodableVideo, FileNotFoundError) as exc:
            item.rejects.append(_reject(video, "error", f"video {vid}: nothing decodable: {exc}"))
        else:
            for warning in result.warnings:
                item.rejects.append(_reject(video, "warning", f"video {vid}: {warning}; events cover what decoded"))
            for event, keyframes in zip(result.events, result.keyframes or [[]] * len(result.events)):
                item.events.append(dict(
                    event_key=f"{vid}#{event.index}", video_id=vid, event_index=event.index,
                    start_frame=event.start_frame, end_frame=event.end_frame, start_time=event.start_time,
                    end_time=event.end_time, frame_count=event.frame_count, fps=result.fps,
                    keyframes=[str(p) for p in keyframes], fingerprint=fp,
                ))
        out.append(item)
        if progress:
            progress(i, len(videos))
    return out


def commit(plan: incremental.Plan, computed: list[VideoEvents], workspace: Workspace) -> SegmentResult:
    events_path, rejects_path = workspace.table("events"), workspace.rejects(STAGE)
    previous_events = incremental.load_previous(events_path, schemas.EVENTS)
    previous_rejects = incremental.load_previous(rejects_path, schemas.REJECTS)
    new_events = pa.Table.from_pylist([e for c in computed for e in c.events], schema=schemas.EVENTS)
    new_rejects = pa.Table.from_pylist([r for c in computed for r in c.rejects], schema=schemas.REJECTS)
    events = incremental.merge(previous_events, plan, new_events, "video_id",
                               [("video_id", "ascending"), ("event_index", "ascending")], schemas.EVENTS)
    rejects = incremental.merge(previous_rejects, plan, new_rejects, "item_id",
                                [("item_id", "ascending"), ("reason", "ascending")], schemas.REJECTS)
    # Rejects first: if we die between the two writes, the events table still holds the old
    # fingerprints, so the rerun recomputes these videos and rewrites both.
    incremental.commit(rejects, rejects_path, plan)
    wrote = incremental.commit(events, events_path, plan)
    _drop_stale_keyframes(workspace, plan)
    counts = {**plan.counts, "events": events.num_rows,
              "videos": len(plan.fingerprints),
              "rejects": sum(r["severity"] == "error" for r in rejects.to_pylist()),
              "warnings": sum(r["severity"] == "warning" for r in rejects.to_pylist())}
    return SegmentResult(counts, events_path, wrote)


def run(config: PipelineConfig, videos: pa.Table, workspace: Workspace, force: bool = False,
        progress: Callable[[int, int], None] | None = None) -> SegmentResult:
    todo = plan(config, videos, workspace, force)
    rows = {v["video_id"]: v for v in videos.to_pylist()}
    computed = compute(config, [rows[v] for v in todo.compute], todo.fingerprints, workspace, progress)
    return commit(todo, computed, workspace)


def _reject(video: dict, severity: str, reason: str) -> dict:
    return dict(stage=STAGE, severity=severity, item_kind="video", item_id=video["video_id"],
                source_file=video["path"], source_row=None, column=None, reason=reason, quarantine_path=None)


def _drop_stale_keyframes(workspace: Workspace, plan: incremental.Plan) -> None:
    """Keyframes of removed videos and of superseded fingerprints are deleted after the commit."""
    for vid, old in plan.previous.items():
        if plan.fingerprints.get(vid) != old:
            shutil.rmtree(keyframe_dir(workspace, vid, old), ignore_errors=True)
