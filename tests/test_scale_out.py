"""Scale-out: the same pipeline on a two-node Ray cluster (issue #8, part 3).

A head (1 CPU, resource `marc_head`) and a second node (2 CPUs, resource `marc_node2`) are started
with `ray start` on 127.0.0.1; MARC_RAY_ADDRESS points `marc up` and the flow at the head; the ci-tiny
pipeline runs with `train.placement_strategy: SPREAD` (tests/two_node.py, shared with
test_browser_ui.py). Which node ran what comes from Ray's own state API (the dashboard's
`/api/v0/tasks|actors|nodes`, what `ray list tasks --detail` prints), and for training also from the
placement each rank recorded in the run's result.json.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import listeners_of
from two_node import HEAD_LABEL, NODE2_LABEL, mlflow_api

pytestmark = pytest.mark.integration

# Prefect task names (flows/tasks.py); prefect-ray submits each task run as a Ray task of that name.
STAGE_TASKS = {"sample-data", "ingest", "segment-plan", "segment-shard", "segment-commit", "embed-train", "embed",
               "retrieve", "warmup", "rollout", "train", "evaluate"}
STAGES = {"ingest", "segment", "embed-train", "embed", "retrieve", "warmup", "rollout", "train", "warmup-student",
          "evaluate"}


def test_pipeline_completes_on_an_external_two_node_cluster(two_node_run):
    run = two_node_run
    assert run.watch.returncode == 0 and "COMPLETED" in run.watch.stdout.upper(), \
        (run.watch.stdout + run.watch.stderr)[-4000:]
    assert sorted(run.cluster.node_labels().values()) == [HEAD_LABEL, NODE2_LABEL]
    assert run.stack.env["MARC_RAY_ADDRESS"] == run.cluster.address
    assert "ray" not in run.stack.pids()  # `marc up` left the external Ray alone
    assert run.parent["info"]["status"] == "FINISHED"
    assert set(run.children) == STAGES, sorted(run.children)
    assert all(r["info"]["status"] == "FINISHED" for r in run.children.values())


def test_stage_tasks_ran_on_both_nodes(two_node_run):
    cluster = two_node_run.cluster
    labels = cluster.node_labels()
    tasks = [t for t in cluster.state("tasks") if t["type"] == "NORMAL_TASK"]
    stage_tasks = [t for t in tasks if t["name"] in STAGE_TASKS and t["state"] == "FINISHED"]
    assert {t["name"] for t in stage_tasks} == STAGE_TASKS, sorted({t["name"] for t in tasks})
    by_node: dict[str, list[str]] = defaultdict(list)
    for task in stage_tasks:
        by_node[labels.get(task["node_id"], task["node_id"])].append(task["name"])
    print({node: sorted(names) for node, names in by_node.items()})
    assert set(by_node) == {HEAD_LABEL, NODE2_LABEL}, dict(by_node)
    # The stages' own Ray tasks (rollout's shards, evaluate's arms) also ran where Ray put them.
    inner = {(t["func_or_class_name"], labels.get(t["node_id"])) for t in tasks if t["name"] not in STAGE_TASKS}
    assert all(node in (HEAD_LABEL, NODE2_LABEL) for _, node in inner), inner


def test_train_ran_one_ray_train_worker_on_each_node(two_node_run):
    run, cluster = two_node_run, two_node_run.cluster
    labels = cluster.node_labels()
    # Ray's view: the Ray Train worker actors and their nodes.
    workers = [a for a in cluster.state("actors") if "TrainWorker" in (a.get("class_name") or "")]
    assert len(workers) == 2, [(a["class_name"], a["state"]) for a in workers]
    assert sorted(labels[a["node_id"]] for a in workers) == sorted([HEAD_LABEL, NODE2_LABEL]), workers

    # The run's own record: each rank wrote where it ran (stages/train/launch.py); rank 0 and 1 differ.
    pointer = json.loads((run.home / "checkpoints" / "student-latest.json").read_text())
    result = json.loads((Path(pointer["run_dir"]) / "result.json").read_text())
    placed = result["workers"]
    assert [w["rank"] for w in placed] == [0, 1], placed
    assert sorted(labels[w["node_id"]] for w in placed) == sorted([HEAD_LABEL, NODE2_LABEL]), placed
    assert {w["pid"] for w in placed} == {a["pid"] for a in workers}
    assert result["step"] == 2 and result["final_model"]

    # MLflow: the train stage finished and registered the student it trained.
    train = run.children["train"]
    params = {p["key"]: p["value"] for p in train["data"]["params"]}
    assert params.get("placement_strategy") == "SPREAD" and params.get("workers") == "2", params
    model = mlflow_api(run.mlflow_uri, "registered-models/get", params={"name": "marc-student"})["registered_model"]
    assert model["latest_versions"][0]["run_id"] == train["info"]["run_id"]


def test_both_nodes_listen_on_loopback_only(two_node_run):
    nodes = two_node_run.cluster.nodes
    listeners = listeners_of({n.pid for n in nodes})
    assert listeners, "no listening socket found for the Ray nodes"
    off = [(pid, addr, port) for pid, addr, port in listeners if addr != "127.0.0.1"]
    assert not off, off
