"""Prefect tasks of flow `marc`: each loads the preset, calls a stage, records it in MLflow.

They live in this importable module, not next to the flow: Prefect loads the flow's file as
a script module (`marc`) that Ray workers cannot import, while tasks defined here pickle by
reference to `flows.tasks`, which every worker of the venv can import.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from infra import stack, tracking
from infra.presets import load_preset
from data_contracts import schemas
from stages import ingest, sample_data
from stages.common.arrow_io import read_table
from stages.common.workspace import Workspace
from stages.embed import stage as embed
from stages.embed import train as embed_train
from stages.evaluate import stage as evaluate
from stages.retrieve import stage as retrieve
from stages.rollout import stage as rollout
from stages.train import stage as train
from stages.warmup import stage as warmup
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


def _table(workspace: Workspace, name: str, stage: str):
    path = workspace.table(name)
    if not path.is_file():
        raise FileNotFoundError(f"no {name} table at {path}: run stage {stage} first")
    return read_table(path, schemas.ALL[name])


def _ground_truth(data_dir: str) -> Path | None:
    """The data folder's optional events.jsonl (ground-truth events and captions)."""
    path = Path(data_dir) / "events.jsonl"
    return path if path.is_file() else None


@task(name="embed-train")
def embed_train_task(preset: str, data_dir: str, home: str, force: bool, run_id: str) -> dict:
    config, workspace = load_preset(preset), Workspace(Path(home))
    truth = _ground_truth(data_dir)
    if truth is None and not config.embed.clip_checkpoint:
        raise FileNotFoundError(f"embed-train needs event captions ({Path(data_dir) / 'events.jsonl'}) or a CLIP "
                                "checkpoint (embed.clip_checkpoint in the preset)")
    result = embed_train.run(config, truth, _table(workspace, "videos", "ingest"),
                             _table(workspace, "questions", "ingest"), workspace, force=force)
    scalars = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    tracking.log_metrics(run_id, {**scalars, "trained": int(result.trained)})
    tracking.log_curve(run_id, "loss", result.metrics.get("loss_curve", []), every=result.metrics.get("loss_every", 1))
    if result.trained:
        tracking.log_artifact_dir(run_id, result.checkpoint, "checkpoint")
    get_run_logger().info("embed-train: %s (checkpoint %s)", scalars, result.checkpoint)
    return {"checkpoint": str(result.checkpoint), "trained": result.trained, "metrics": scalars}


@task(name="embed")
def embed_task(preset: str, data_dir: str, home: str, checkpoint: str, force: bool, run_id: str) -> dict:
    config, workspace = load_preset(preset), Workspace(Path(home))
    result = embed.run(config, _table(workspace, "events", "segment"), _table(workspace, "videos", "ingest"),
                       workspace, Path(checkpoint), ground_truth=_ground_truth(data_dir), force=force,
                       progress=StageProgress("embed", unit="videos"))
    tracking.log_metrics(run_id, {**result.counts, **result.metrics, "wrote": int(result.wrote),
                                  "table_version": result.version or 0})
    manifest = {"stage": "embed", "counts": result.counts, "metrics": result.metrics, "lancedb": str(result.db_path),
                "table": result.table, "version": result.version}
    tracking.log_json_artifact(run_id, "manifest.json", manifest)
    get_run_logger().info("embed: %s %s", result.counts, result.metrics)
    return manifest


@task(name="retrieve")
def retrieve_task(preset: str, data_dir: str, home: str, force: bool, run_id: str) -> dict:
    config, workspace = load_preset(preset), Workspace(Path(home))
    result = retrieve.run(config, _table(workspace, "questions", "ingest"), _table(workspace, "videos", "ingest"),
                          workspace, ground_truth=_ground_truth(data_dir), force=force,
                          progress=StageProgress("retrieve", unit="questions"))
    recall = {f"{name}/{family}": value for family, scores in result.recall.items()
              for name, value in scores.items()}
    tracking.log_metrics(run_id, {**result.counts, **recall, "wrote": int(result.wrote)})
    manifest = {"stage": "retrieve", "counts": result.counts, "recall": result.recall,
                "outputs": {"memories": str(result.memories_path)}}
    tracking.log_json_artifact(run_id, "manifest.json", manifest)
    get_run_logger().info("retrieve: %s; recall %s", result.counts, result.recall)
    return manifest


def cluster_gpus(preset: str) -> int:
    """GPUs per model task from the preset, checked against the connected Ray cluster (fails at once)."""
    import ray

    return stack.require_gpus(load_preset(preset).compute.gpus_per_task, ray.cluster_resources())


@task(name="warmup")
def warmup_task(preset: str, data_dir: str, home: str, mode: str, force: bool, run_id: str) -> dict:
    config, workspace = load_preset(preset), Workspace(Path(home))
    logger = get_run_logger()
    result = warmup.run(config, Path(data_dir), workspace, mode=mode, force=force,
                        progress=StageProgress(f"warmup-{mode}", unit="steps"), log=logger.info)
    tracking.log_metrics(run_id, {**result.metrics, "skipped": int(result.skipped), "cached": int(result.cached)})
    for row in result.curves:  # loss and held-out accuracy against steps (minutes are a column too)
        step = int(row.get("step", 0))
        tracking.log_metrics(run_id, {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))},
                             step=step)
    if not (result.skipped or result.cached):
        tracking.log_json_artifact(run_id, "curves.json", result.curves)
    logger.info("warmup (%s): %s", mode, result.metrics)
    return {"checkpoint": str(result.checkpoint_dir), "metrics": result.metrics, "cached": result.cached}


@task(name="rollout")
def rollout_task(preset: str, home: str, teacher_dir: str, force: bool, run_id: str) -> dict:
    config, workspace = load_preset(preset), Workspace(Path(home))
    result = rollout.run(config, workspace, teacher_dir, force=force, use_ray=True, num_gpus=cluster_gpus(preset),
                         progress=StageProgress("rollout", unit="questions"))
    tracking.log_metrics(run_id, {k: v for k, v in result.counts.items() if isinstance(v, (int, float))})
    manifest = {"stage": "rollout", "counts": result.counts, "outputs": {"rollouts": str(result.path)}}
    tracking.log_json_artifact(run_id, "manifest.json", manifest)
    get_run_logger().info("rollout: %s", result.counts)
    return manifest


@task(name="train")
def train_task(preset: str, home: str, teacher_dir: str, force: bool, run_id: str) -> dict:
    config, workspace = load_preset(preset), Workspace(Path(home))
    result = train.run(config, workspace, teacher_dir, use_ray=True, num_gpus=cluster_gpus(preset),
                       on_metrics=tracking.RunMetrics(run_id), force=force)
    counts = {k: v for k, v in result.counts.items() if isinstance(v, (int, float))}
    tracking.log_metrics(run_id, {**counts, "steps": result.steps, "resumed_from": result.resumed_from,
                                  "cached": int(result.cached)})
    if not result.cached:
        tracking.log_artifact_dir(run_id, result.student_dir, "student")
        tracking.register_model(run_id, "student", "marc-student")
    get_run_logger().info("train: %d steps (resumed from %d) -> %s", result.steps, result.resumed_from,
                          result.student_dir)
    return {"student": str(result.student_dir), "steps": result.steps, "metrics": result.metrics}


@task(name="evaluate")
def evaluate_task(preset: str, home: str, model_home: str, data_label: str, report_id: str, run_id: str) -> dict:
    """Every arm on the test split of the data in `home`, with the checkpoints of `model_home`."""
    from prefect.artifacts import create_markdown_artifact

    config = load_preset(preset)
    checkpoints = evaluate.Checkpoints.from_workspace(config, Workspace(Path(model_home)))
    result = evaluate.run(config, Workspace(Path(home)), checkpoints, use_ray=True, num_gpus=cluster_gpus(preset),
                          progress=StageProgress("evaluate", unit="answers"), report_id=report_id,
                          data_label=data_label, reports_root=Path(model_home) / "reports")
    metrics = {}
    for name, arm in result.report["arms"].items():
        metrics.update({f"{name}/acc/{f}": a for f, a in arm["accuracy"].items()})
        metrics.update({f"{name}/retention/{f}": r for f, r in arm["retention"].items() if r is not None})
        metrics.update({f"{name}/format_rate": arm["format_rate"], f"{name}/visual_tokens": arm["visual_tokens"]})
        if arm["peak_forward_bytes"] is not None:
            metrics[f"{name}/peak_forward_mb"] = arm["peak_forward_bytes"] / 2**20
        metrics.update({f"{name}/latency_ms/{k}": 1000 * v for k, v in arm["latency_s"].items()})
    tracking.log_metrics(run_id, {k: v for k, v in metrics.items() if v is not None})
    tracking.log_artifact_dir(run_id, result.report_dir, "report")
    create_markdown_artifact(result.markdown, key="marc-report", description="MARC evaluation report")
    get_run_logger().info("evaluate: report %s; goals %s", result.report_dir,
                          [(g["goal"], g["met"]) for g in result.report["goals"]])
    return {"report_dir": str(result.report_dir), "latest": str(result.latest_dir), "goals": result.report["goals"]}
