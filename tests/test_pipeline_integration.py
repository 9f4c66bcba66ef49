"""End to end through the real local stack: marc up, deployments, a flow run on Ray, MLflow runs, marc down.

Everything a user does from a shell, done from a shell: `marc up`, then
`prefect deployment run marc/full-pipeline --watch` with the env `marc env` prints,
then the tables through `marc show` and the MLflow runs through its REST API.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from two_node import mlflow_api as _mlflow

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# cpu-tiny with a handful of steps per stage: every stage runs, through the real stack, in minutes.
PRESET = str(PROJECT_ROOT / "tests" / "presets" / "ci-tiny.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pids: set[int]) -> set[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, grew = set(pids), True
    while grew:
        more = {p for p, pp in parent.items() if pp in found and p not in found}
        found |= more
        grew = bool(more)
    return {p for p in found if Path(f"/proc/{p}").exists()}


def _cmdline(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        return f"state={stat[0]} ppid={stat[1]} pgid={stat[2]} sid={stat[3]} {cmd}"
    except OSError:
        return "(gone)"


class Shell:
    def __init__(self, env: dict[str, str]):
        self.env = env

    def __call__(self, *cmd: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{shlex.join(cmd)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
        return proc

    def client_env(self) -> dict[str, str]:
        exports = self(str(BIN / "marc"), "env").stdout
        env = dict(self.env)
        for line in exports.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0] if value else ""
        return env


@pytest.fixture(scope="module")
def stack():
    home = Path(tempfile.mkdtemp(prefix="mi-", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MARC_RAY_ADDRESS", "PREFECT_HOME")}
    env.update(MARC_HOME=str(home), MARC_PREFECT_PORT=str(_free_port()), MARC_MLFLOW_PORT=str(_free_port()),
               MARC_RAY_PORT=str(_free_port()), PATH=f"{BIN}:{env.get('PATH', '')}")
    shell = Shell(env)
    up = shell(str(BIN / "marc"), "up", check=False)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield shell, home
    finally:
        pids = {json.loads(p.read_text())["pid"] for p in (home / "run").glob("*.pid")}
        before = _descendants(pids)
        down = shell(str(BIN / "marc"), "down", check=False)
        # A zombie (state Z) is dead; it waits for init to reap it, as `marc up` has exited.
        left = {p: _cmdline(p) for p in before if Path(f"/proc/{p}").exists() and not _cmdline(p).startswith("state=Z")}
        assert down.returncode == 0, down.stdout + down.stderr
        assert not left, f"marc down left processes behind: {left}"


def _runs(uri: str) -> list[dict]:
    exp = _mlflow(uri, "experiments/get-by-name", params={"experiment_name": "marc"})["experiment"]
    return _mlflow(uri, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}).get("runs", [])


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_full_pipeline_deployment_through_the_real_stack(stack):
    shell, home = stack
    env = shell.client_env()
    assert env["PREFECT_API_URL"].startswith("http://127.0.0.1:")
    client = Shell(env)

    # Exactly what a user types, from a plain shell with the stack's env.
    run = client(str(BIN / "prefect"), "deployment", "run", "marc/full-pipeline", "--param", f"preset={PRESET}",
                 "--watch")
    assert "Completed" in run.stdout or "COMPLETED" in run.stdout.upper(), run.stdout[-3000:]

    # The sample set was generated under MARC_HOME and ingested.
    events = [json.loads(l) for l in (home / "sample-data" / "events.jsonl").read_text().splitlines()]
    videos = [json.loads(l) for l in client(str(BIN / "marc"), "show", "videos", "--format", "jsonl").stdout.splitlines()]
    assert sorted(v["video_id"] for v in videos) == sorted(e["path"] for e in events)
    questions = client(str(BIN / "marc"), "show", "questions", "--format", "jsonl", "--where", "split=test").stdout
    assert questions and all(json.loads(l)["split"] == "test" for l in questions.splitlines())

    # MLflow: one parent run tagged with the flow run, a nested run per stage with counts and manifest.
    uri = env["MLFLOW_TRACKING_URI"]
    runs = _runs(uri)
    parents = [r for r in runs if _tags(r).get("marc.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    parent_id = parents[0]["info"]["run_id"]
    assert _tags(parents[0])["prefect.flow_run_id"]
    children = {_tags(r)["marc.stage"]: r for r in runs if _tags(r).get("mlflow.parentRunId") == parent_id}
    assert set(children) == {"ingest", "segment", "embed-train", "embed", "retrieve", "warmup", "rollout", "train",
                             "warmup-student", "evaluate"}
    assert all(r["info"]["status"] == "FINISHED" for r in children.values())
    retrieve_metrics = {m["key"]: m["value"] for m in children["retrieve"]["data"]["metrics"]}
    assert retrieve_metrics["recall_at_3/shape"] >= 0.95 and retrieve_metrics["recall_at_1/colour"] >= 0.8
    embed_metrics = {m["key"]: m["value"] for m in children["embed"]["data"]["metrics"]}
    assert embed_metrics["events_per_second"] > 0
    segment_metrics = {m["key"]: m["value"] for m in children["segment"]["data"]["metrics"]}
    assert segment_metrics["computed"] == len(events) and segment_metrics["reused"] == 0
    assert segment_metrics["events"] == sum(len(e["events"]) for e in events)
    ingest_run = children["ingest"]
    metrics = {m["key"]: m["value"] for m in ingest_run["data"]["metrics"]}
    assert metrics["videos"] == len(events) and metrics["rejects"] == 0
    assert metrics["questions"] == sum(1 for _ in (home / "sample-data" / "questions.jsonl").open())
    params = {p["key"]: p["value"] for p in ingest_run["data"]["params"]}
    assert params["preset"] == PRESET and "video_extensions" in params
    # Training logged per-step metrics with TRL's names and registered the student.
    train_metrics = {m["key"] for m in children["train"]["data"]["metrics"]}
    assert {"loss", "kl", "reward", "clip_ratio", "frac_reward_zero_std"} <= train_metrics, train_metrics
    model = _mlflow(uri, "registered-models/get", params={"name": "marc-student"})["registered_model"]
    assert model["latest_versions"][0]["run_id"] == children["train"]["info"]["run_id"]
    artifacts = _mlflow(uri, "artifacts/list", params={"run_id": ingest_run["info"]["run_id"]})
    assert "manifest.json" in [f["path"] for f in artifacts.get("files", [])]

    # Evaluate: every arm in report.json (latest), the report and its plots on the MLflow run, and the
    # Markdown report as a Prefect artifact of the flow run.
    report = json.loads((home / "reports" / "latest" / "report.json").read_text())
    assert set(report["arms"]) == {"teacher_full", "teacher_quarter", "teacher_1group", "teacher_vmr",
                                   "merge_uniform", "vmr_compress", "sft_student", "cgrpo_student"}
    assert all(a["questions"] == report["questions"] > 0 and a["latency_s"] for a in report["arms"].values())
    assert report["arms"]["cgrpo_student"]["visual_token_ratio"] < 0.2
    eval_run = children["evaluate"]["info"]["run_id"]
    files = {f["path"] for f in _mlflow(uri, "artifacts/list", params={"run_id": eval_run, "path": "report"})["files"]}
    assert {"report/report.md", "report/report.json", "report/accuracy_vs_tokens.png", "report/latency.png",
            "report/training.png"} <= files, files
    eval_metrics = {m["key"] for m in children["evaluate"]["data"]["metrics"]}
    assert {"cgrpo_student/acc/overall", "teacher_full/latency_ms/end_to_end", "sft_student/visual_tokens"} <= eval_metrics
    flow_run_id = _tags(parents[0])["prefect.flow_run_id"]
    found = requests.post(f"{env['PREFECT_API_URL']}/artifacts/filter", timeout=30,
                          json={"artifacts": {"key": {"any_": ["marc-report"]}}}).json()
    assert any(a["flow_run_id"] == flow_run_id and "cgrpo_student" in a["data"] for a in found), found

    # A new data folder is scored as it is: own tables, the trained models, no training.
    fresh = home / "fresh-data"
    client(str(BIN / "marc"), "sample-data", str(fresh), "--videos", "2", "--seed", "5", "--test-fraction", "1.0")
    scored = client(str(BIN / "marc"), "run", "--stage", "evaluate", "--preset", PRESET, "--data", str(fresh))
    assert "completed" in scored.stdout, scored.stdout[-3000:]
    report = json.loads((home / "reports" / "latest" / "report.json").read_text())
    assert report["data"] == str(fresh.resolve()) and report["questions"] == sum(
        1 for _ in (fresh / "questions.jsonl").open())
    assert {_tags(r)["marc.stage"] for r in _runs(uri) if _tags(r).get("marc.stage")} >= {"evaluate"}
    assert len([r for r in _runs(uri) if _tags(r).get("marc.stage") == "train"]) == 1  # nothing retrained

    # `marc run --stage ingest` triggers the per-stage deployment and exits 0; a bad folder exits non-zero.
    again = client(str(BIN / "marc"), "run", "--stage", "ingest", "--preset", PRESET)
    assert "completed" in again.stdout
    assert len([r for r in _runs(uri) if _tags(r).get("marc.kind") == "pipeline"]) == 3  # + the evaluate run
    broken = client(str(BIN / "marc"), "run", "--stage", "ingest", "--preset", PRESET, "--data",
                    str(home / "no-such-folder"), check=False)
    assert broken.returncode != 0 and "FAILED" in broken.stdout


def _stage_metrics(uri: str, stage: str) -> dict[str, float]:
    """Metrics of the newest nested run of `stage`."""
    runs = [r for r in _runs(uri) if _tags(r).get("marc.stage") == stage]
    newest = max(runs, key=lambda r: r["info"]["start_time"])
    return {m["key"]: m["value"] for m in newest["data"]["metrics"]}


def test_rerun_reuses_everything_and_changes_touch_only_their_videos(stack):
    shell, home = stack
    client = Shell(shell.client_env())
    uri = client.env["MLFLOW_TRACKING_URI"]
    events_table = home / "tables" / "events.arrow"
    before = events_table.read_bytes()

    client(str(BIN / "prefect"), "deployment", "run", "marc/full-pipeline", "--param", f"preset={PRESET}", "--watch")
    counts = _stage_metrics(uri, "segment")
    assert counts["computed"] == 0 and counts["removed"] == 0 and counts["reused"] == counts["videos"]
    assert events_table.read_bytes() == before
    for stage in ("embed", "retrieve"):  # downstream of unchanged items: nothing to do either
        assert _stage_metrics(uri, stage)["computed"] == 0, stage
    assert _stage_metrics(uri, "embed-train")["trained"] == 0
    assert _stage_metrics(uri, "warmup")["cached"] == 1 and _stage_metrics(uri, "train")["cached"] == 1

    # Replace one video, add one, delete one; ingest the folder again, then rerun marc/segment alone.
    videos = sorted((home / "sample-data" / "videos").glob("*.mp4"))
    videos[0].write_bytes(videos[1].read_bytes())
    (home / "sample-data" / "videos" / "extra.mp4").write_bytes(videos[2].read_bytes())
    videos[3].unlink()
    client(str(BIN / "marc"), "run", "--stage", "ingest", "--preset", PRESET)
    client(str(BIN / "prefect"), "deployment", "run", "marc/segment", "--param", f"preset={PRESET}", "--watch")
    counts = _stage_metrics(uri, "segment")
    assert (counts["computed"], counts["removed"]) == (2, 1), counts
    keys = [json.loads(l)["event_key"] for l in client(str(BIN / "marc"), "show", "events", "--format", "jsonl").stdout.splitlines()]
    assert len(keys) == len(set(keys)) and any(k.startswith("videos/extra.mp4#") for k in keys)


def test_up_is_idempotent_and_status_reports(stack):
    shell, home = stack
    pids = {p.name: p.read_text() for p in (home / "run").glob("*.pid")}
    again = shell(str(BIN / "marc"), "up", "--no-deploy")
    assert {p.name: p.read_text() for p in (home / "run").glob("*.pid")} == pids
    status = shell(str(BIN / "marc"), "status")
    assert "Prefect UI: http://127.0.0.1:" in status.stdout and "MLflow UI:  http://127.0.0.1:" in status.stdout
    assert "stopped" not in status.stdout, status.stdout
