"""Prefect tasks of flow `marc`: each loads the preset, calls a stage, records it in MLflow.

They live in this importable module, not next to the flow: Prefect loads the flow's file as
a script module (`marc`) that Ray workers cannot import, while tasks defined here pickle by
reference to `flows.tasks`, which every worker of the venv can import.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from infra import tracking
from infra.presets import load_preset
from stages import ingest, sample_data
from stages.common.workspace import Workspace
from stages.segment import stage as segment
from flows.progress import StageProgress


@task(name="sample-data", retries=1)
def sample_data_task(preset: str, data_dir: str) -> dict:
    cfg = load_preset(preset).sample_data
    progress = StageProgress("sample-data", unit="videos")
    summary = sample_data.generate(Path(data_dir), videos=cfg.videos, seed=cfg.seed, width=cfg.width,
                                   height=cfg.height, fps=cfg.fps, test_fraction=cfg.test_fraction,
                                   progress=progress)
    return {"videos": summary.videos, "questions": summary.questions, "data_dir": str(summary.out_dir)}


@task(name="ingest")
def ingest_task(preset: str, data_dir: str, home: str, parent_run_id: str) -> dict:
    config = load_preset(preset)
    params = {"preset": preset, "data_dir": data_dir, **config.ingest.model_dump()}
    with tracking.stage_run(parent_run_id, "ingest", params) as run:
        result = ingest.run(config, Path(data_dir), Workspace(Path(home)), progress=StageProgress("ingest", "videos"))
        tracking.log_metrics(run.run_id, result.counts)
        manifest = {"stage": "ingest", "code_version": ingest.CODE_VERSION, "counts": result.counts,
                    "outputs": {name: str(path) for name, path in result.outputs.items()}}
        tracking.log_json_artifact(run.run_id, "manifest.json", manifest)
    get_run_logger().info("ingest: %s", result.counts)
    return manifest


@task(name="segment-plan")
def segment_plan_task(preset: str, home: str, force: bool):
    workspace = Workspace(Path(home))
    videos = segment.load_inputs(workspace)
    plan = segment.plan(load_preset(preset), videos, workspace, force)
    rows = {v["video_id"]: v for v in videos.to_pylist()}
    return plan, [rows[v] for v in plan.compute]


@task(name="segment-shard")
def segment_shard_task(preset: str, home: str, videos: list[dict], fingerprints: dict[str, str], shard: int):
    progress = StageProgress(f"segment-shard-{shard}", unit="videos")
    return segment.compute(load_preset(preset), videos, fingerprints, Workspace(Path(home)), progress)


@task(name="segment-commit")
def segment_commit_task(home: str, plan, computed: list, run_id: str) -> dict:
    result = segment.commit(plan, [item for shard in computed for item in shard], Workspace(Path(home)))
    tracking.log_metrics(run_id, result.counts)
    manifest = {"stage": "segment", "code_version": segment.CODE_VERSION, "counts": result.counts,
                "wrote": result.wrote, "outputs": {"events": str(result.events_path)}}
    tracking.log_json_artifact(run_id, "manifest.json", manifest)
    get_run_logger().info("segment: %s", result.counts)
    return manifest


def split_shards(items: list, count: int) -> list[list]:
    """Round-robin split, so shards get similar mixes of long and short items."""
    return [items[i::count] for i in range(count) if items[i::count]]
