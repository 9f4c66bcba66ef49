"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The tracking server must be reachable when a run starts: we fail fast with a message
naming the tracking URI instead of buffering, because a pipeline run whose metrics are
silently lost is worse than one that did not start (see README, Reliability).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

EXPERIMENT = "marc"


class TrackingUnavailable(RuntimeError):
    pass


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingUnavailable("MLFLOW_TRACKING_URI is not set: start the stack with `marc up` or point it at a server")
    return uri


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> str:
    uri = uri or tracking_uri()
    if uri.startswith("http"):
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).raise_for_status()
        except requests.RequestException as exc:
            raise TrackingUnavailable(f"MLflow tracking server at {uri} is not reachable ({exc.__class__.__name__}); "
                                      "start it with `marc up` or fix MLFLOW_TRACKING_URI") from exc
    return uri


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=check_reachable())


def _experiment_id(client) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    return exp.experiment_id if exp else client.create_experiment(EXPERIMENT)


def start_parent_run(flow_run_id: str, flow_run_name: str, params: dict[str, Any]) -> str:
    client = _client()
    run = client.create_run(
        _experiment_id(client),
        run_name=f"marc {flow_run_name}",
        tags={"prefect.flow_run_id": flow_run_id, "prefect.flow_run_name": flow_run_name, "marc.kind": "pipeline"},
    )
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def start_stage_run(parent_run_id: str, stage: str, params: dict[str, Any]) -> str:
    client = _client()
    parent = client.get_run(parent_run_id)
    run = client.create_run(
        parent.info.experiment_id,
        run_name=stage,
        tags={"mlflow.parentRunId": parent_run_id, "marc.stage": stage, "marc.kind": "stage",
              "prefect.flow_run_id": parent.data.tags.get("prefect.flow_run_id", "")},
    )
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def metric_key(name: str) -> str:
    """MLflow keys allow letters, digits, _ - . / space and colon: `recall@1/shape` -> `recall_at_1/shape`."""
    return re.sub(r"[^\w\-./ :]", "_", name.replace("@", "_at_"))


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics in one batch (None values are skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(metric_key(k), float(v), now, step or 0) for k, v in metrics.items() if v is not None]
    client = _client()
    for i in range(0, len(items), 1000):  # the REST API caps a batch at 1000 metrics
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_curve(run_id: str, key: str, values: list[float], every: int = 1) -> None:
    """A learning curve as one metric over steps 0, every, 2*every, ..."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(metric_key(key), float(v), now, i * every) for i, v in enumerate(values)]
    client = _client()
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def log_json_artifact(run_id: str, name: str, payload: Any) -> None:
    client = _client()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(payload, indent=2, default=str))
        client.log_artifact(run_id, str(path))


def log_artifact_file(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    _client().log_artifact(run_id, str(path), artifact_path)


def log_artifact_dir(run_id: str, folder: Path, artifact_path: str | None = None) -> None:
    _client().log_artifacts(run_id, str(folder), artifact_path)


def end_run(run_id: str, ok: bool) -> None:
    _client().set_terminated(run_id, "FINISHED" if ok else "FAILED")


def _log_params(client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    flat = _flatten(params)
    items = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items())]
    for i in range(0, len(items), 100):  # the REST API caps a batch at 100 params
        client.log_batch(run_id, params=items[i : i + 100])


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class stage_run:
    """Context manager for a stage's nested run: FINISHED on success, FAILED on any exception."""

    def __init__(self, parent_run_id: str, stage: str, params: dict[str, Any]):
        self.parent_run_id, self.stage, self.params = parent_run_id, stage, params
        self.run_id = ""

    def __enter__(self) -> "stage_run":
        self.run_id = start_stage_run(self.parent_run_id, self.stage, self.params)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        end_run(self.run_id, ok=exc_type is None)


class RunMetrics:
    """A picklable `on_metrics(step, metrics)` callback that logs to one MLflow run (used by rank 0
    of Ray Train workers, which get MLFLOW_TRACKING_URI from the job's runtime env)."""

    def __init__(self, run_id: str):
        self.run_id = run_id

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        log_metrics(self.run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v == v},
                    step=step)


def register_model(run_id: str, artifact_path: str, name: str) -> str:
    """Register the run's artifact folder as a new version of model `name`; returns the version."""
    client = _client()
    try:
        client.create_registered_model(name)
    except Exception:  # already registered: add a version
        pass
    run = client.get_run(run_id)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/{artifact_path}", run_id=run_id)
    return version.version


def download_registered_model(name: str, dest_root: Path) -> tuple[Path, str] | None:
    """(local folder, version) of the newest version of registered model `name`, downloaded once into
    dest_root/<name>-v<version>; None when no version is registered."""
    client = _client()
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    dest = Path(dest_root) / f"{name}-v{newest.version}"
    if not (dest / "marc_model.json").is_file():
        import shutil

        from mlflow.artifacts import download_artifacts

        staging = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        got = Path(download_artifacts(artifact_uri=newest.source, dst_path=str(staging),
                                      tracking_uri=check_reachable()))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(got, dest)
        shutil.rmtree(staging, ignore_errors=True)
    return dest, str(newest.version)
