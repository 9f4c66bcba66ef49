"""The Prefect flow `marc`: one task per stage, on Ray, tracked in MLflow. Wiring only.

Deployments (prefect.yaml) run this flow with `stages` set to all stages
(`full-pipeline`) or to one (`ingest`, ...). Each stage task loads the preset, calls the
stage's plain `run(...)`, and records its counts and manifest in a nested MLflow run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options

from infra import stack, tracking
from infra.home import dataset_home, marc_home, sample_data_dir
from infra.presets import DEFAULT_PRESET, load_preset
from stages.common.workspace import Workspace
from stages.embed import train as embed_train
from flows.tasks import (
    evaluate_task,
    rollout_task,
    train_task,
    warmup_task,
    embed_task,
    embed_train_task,
    retrieve_task,
    split_shards,
    ingest_task,
    sample_data_task,
    segment_commit_task,
    segment_plan_task,
    segment_shard_task,
)

STAGES: tuple[str, ...] = ("ingest", "segment", "embed-train", "embed", "retrieve", "warmup", "rollout", "train",
                           "evaluate")
"""Stages in pipeline order; each has a deployment `marc/<stage>` in prefect.yaml."""

_FORWARDED_ENV = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MARC_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")


def _ray_task_runner() -> RayTaskRunner:
    """Connect to the stack's Ray (or MARC_RAY_ADDRESS); Ray workers get the client env vars."""
    env = {**stack.client_env(), **{k: v for k, v in os.environ.items() if k in _FORWARDED_ENV + ("MARC_RAY_ADDRESS",)}}
    address = env.get("MARC_RAY_ADDRESS")
    runtime_env = {"env_vars": {k: env[k] for k in _FORWARDED_ENV if k in env}}
    return RayTaskRunner(address=address, init_kwargs={"runtime_env": runtime_env, "log_to_driver": True})


@flow(name="marc", task_runner=_ray_task_runner(), log_prints=True)
def marc(stages: list[str] | None = None, data_dir: str | None = None, preset: str = DEFAULT_PRESET,
         force: bool = False) -> dict:
    """Run the MARC pipeline stages in order.

    Args:
        stages: stages to run (default: all, in pipeline order).
        data_dir: a data folder in the Video-R1 format; default: the generated EventQA sample
            set under MARC_HOME, generated first if missing.
        preset: a preset name under infra/presets or a YAML path.
        force: recompute every item instead of reusing unchanged ones.

    `stages=["evaluate"]` with a `data_dir` scores the current checkpoints on that folder's test
    split without retraining: the folder gets a workspace of its own (MARC_HOME/datasets/<name>),
    is ingested, segmented, embedded with the trained visual tower and retrieved there first.
    """
    logger = get_run_logger()
    selected = [s for s in STAGES if stages is None or s in stages]
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; this pipeline has {list(STAGES)}")
    config = load_preset(preset)
    home = model_home = str(marc_home())
    evaluate_only = data_dir is not None and selected == ["evaluate"]
    if evaluate_only:  # a new data set: its own tables, the models of MARC_HOME
        home = str(dataset_home(Path(data_dir)))
        selected = ["ingest", "segment", "embed", "retrieve", "evaluate"]
    parent = tracking.start_parent_run(
        str(flow_run.id), str(flow_run.name),
        {"preset": preset, "stages": ",".join(selected), "data_dir": data_dir or "(sample)", "force": force,
         "marc_home": home},
    )
    logger.info("MLflow parent run %s; stages %s", parent, selected)
    results: dict[str, dict] = {"mlflow_run_id": parent}
    ok = False
    try:
        with remote_options(num_cpus=config.compute.cpus_per_task, num_gpus=0):
            if data_dir is None:
                data_dir = str(sample_data_dir())
                if "ingest" in selected:
                    results["sample-data"] = sample_data_task.submit(preset, data_dir).result()
            retries = {"retries": config.compute.task_retries, "retry_delay_seconds": 3}
            if "ingest" in selected:
                results["ingest"] = ingest_task.with_options(**retries).submit(preset, data_dir, home, parent).result()
            if "segment" in selected:
                params = {"preset": preset, "force": force, **config.segment.model_dump()}
                with tracking.stage_run(parent, "segment", params) as run:
                    plan, todo = segment_plan_task.submit(preset, home, force).result()
                    shards = [segment_shard_task.with_options(**retries).submit(preset, home, part, plan.fingerprints, i)
                              for i, part in enumerate(split_shards(todo, config.compute.max_shards))]
                    results["segment"] = segment_commit_task.submit(home, plan, [f.result() for f in shards],
                                                                    run.run_id).result()
            # embed needs the visual tower's checkpoint: embed-train returns the cached one when
            # nothing it reads changed, so running only `embed` costs no training.
            if evaluate_only:
                tower = embed_train.latest_checkpoint(Workspace(Path(model_home)))
                if tower is None and not config.embed.clip_checkpoint:
                    raise FileNotFoundError(f"no trained visual tower under {model_home}: run the pipeline first")
                trained = {"checkpoint": str(tower)}
            elif "embed-train" in selected or "embed" in selected:
                with tracking.stage_run(parent, "embed-train", {"preset": preset, "force": force,
                                                                **config.embed.model_dump()}) as run:
                    trained = embed_train_task.with_options(**retries).submit(
                        preset, data_dir, home, force and "embed-train" in selected, run.run_id).result()
                results["embed-train"] = trained
            if "embed" in selected:
                with tracking.stage_run(parent, "embed", {"preset": preset, "force": force,
                                                          **config.embed.model_dump()}) as run:
                    results["embed"] = embed_task.with_options(**retries).submit(
                        preset, data_dir, home, trained["checkpoint"], force, run.run_id).result()
            if "retrieve" in selected:
                with tracking.stage_run(parent, "retrieve", {"preset": preset, "force": force,
                                                             **config.retrieve.model_dump()}) as run:
                    results["retrieve"] = retrieve_task.with_options(**retries).submit(
                        preset, data_dir, home, force, run.run_id).result()
            # The teacher's checkpoint: warmup returns the cached one (or the preset's pretrained path)
            # when nothing it reads changed, so rollout or train alone cost no warm-up.
            if {"warmup", "rollout", "train"} & set(selected):
                with tracking.stage_run(parent, "warmup", {"preset": preset, "force": force,
                                                           **config.warmup.model_dump(), **config.model.model_dump()}) as run:
                    teacher = warmup_task.with_options(**retries).submit(
                        preset, data_dir, home, "teacher", force and "warmup" in selected, run.run_id).result()
                results["warmup"] = teacher
        # Rollout and train start Ray tasks and Ray Train workers of their own: their Prefect tasks
        # hold no CPU, or on a 2-CPU cluster the workers would wait for the task that waits for them.
        with remote_options(num_cpus=0, num_gpus=0):
            if "rollout" in selected or "train" in selected:
                with tracking.stage_run(parent, "rollout", {"preset": preset, "force": force,
                                                            **config.rollout.model_dump()}) as run:
                    results["rollout"] = rollout_task.with_options(**retries).submit(
                        preset, home, teacher["checkpoint"], force and "rollout" in selected, run.run_id).result()
            if "train" in selected:
                with tracking.stage_run(parent, "train", {"preset": preset, "force": force,
                                                          **config.train.model_dump()}) as run:
                    results["train"] = train_task.with_options(**retries).submit(
                        preset, home, teacher["checkpoint"], force, run.run_id).result()
        if "evaluate" in selected and not evaluate_only:  # the SFT student is one of evaluate's arms
            with remote_options(num_cpus=config.compute.cpus_per_task, num_gpus=0):
                with tracking.stage_run(parent, "warmup-student", {"preset": preset, "force": force,
                                                                   **config.warmup.model_dump()}) as run:
                    results["warmup-student"] = warmup_task.with_options(**retries).submit(
                        preset, data_dir, home, "student", force, run.run_id).result()
        if "evaluate" in selected:
            with remote_options(num_cpus=0, num_gpus=0):  # its arms are Ray tasks of their own
                with tracking.stage_run(parent, "evaluate", {"preset": preset, "data_dir": data_dir,
                                                             **config.evaluate.model_dump()}) as run:
                    report_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{flow_run.name}"
                    results["evaluate"] = evaluate_task.with_options(**retries).submit(
                        preset, home, model_home, data_dir, report_id, run.run_id).result()
        ok = True
    finally:
        tracking.end_run(parent, ok)
    return results
