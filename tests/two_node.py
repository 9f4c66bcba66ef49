"""A two-node Ray cluster on 127.0.0.1 and one finished `marc/full-pipeline` run on it.

The session fixture `two_node_run` (imported by conftest.py, so both test_scale_out.py and
test_browser_ui.py share one pipeline run) starts, as a user would on two machines:

    ray start --head --node-ip-address 127.0.0.1 --num-cpus 1 --resources '{"marc_head": 1}' ...
    ray start --address 127.0.0.1:PORT --node-ip-address 127.0.0.1 --num-cpus 2 --resources '{"marc_node2": 1}' ...

then `marc up` with MARC_RAY_ADDRESS pointing at the head (the stack treats that Ray as external and
starts only Prefect, its worker and MLflow), and runs `prefect deployment run marc/full-pipeline
--watch` on the ci-tiny preset with `train.placement_strategy: SPREAD`.

Loopback only: every Ray process gets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps a node's
address 127.0.0.1 and its listeners there (without it Ray swaps 127.0.0.1 for the machine's network
address and listens on all interfaces). `ray start --address` refuses to join a cluster under that
variable ("Multi-node Ray clusters are not supported on Windows and OSX"); `_JOIN` runs the same
`ray start` command with only that check lifted. RAY_AUTH_MODE=disabled is pinned for every Ray
process and client (see conftest.PrivateStack). The head runs Ray's dashboard on 127.0.0.1: its
state API (`/api/v0/tasks`, `/api/v0/actors`, `/api/v0/nodes`) tells which node ran what.

Both `ray start --block` processes run in their own session; teardown stops them and every process
of their sessions by PID (never `ray stop`, which stops every Ray of the machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

from conftest import BIN, PROJECT_ROOT, PrivateStack, cmdline, free_port, pid_alive, process_family

CI_TINY = PROJECT_ROOT / "tests" / "presets" / "ci-tiny.yaml"
HEAD_LABEL, NODE2_LABEL = "marc_head", "marc_node2"
HEAD_CPUS, NODE2_CPUS = 1, 2
"""One CPU on the head and two on the second node: two 1-CPU tasks at once cannot both run on the head,
and Ray Train's default PACK would put both training workers on the second node; SPREAD must not."""

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SCHEDULER_EVENTS": "0",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}

# `ray start` for a joining node with only its "no multi-node under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
# check lifted: the CLI module sees a copy of ray_constants with ENABLE_RAY_CLUSTER=True; everything else
# (node address resolution, the raylet) still sees the real one and stays on 127.0.0.1.
_JOIN = """
import sys, types
import ray._private.ray_constants as constants
import ray.scripts.scripts as scripts
view = types.ModuleType(constants.__name__)
view.__dict__.update(vars(constants))
view.ENABLE_RAY_CLUSTER = True
scripts.ray_constants = view
sys.argv = ["ray"] + sys.argv[1:]
sys.exit(scripts.main())
"""


class RayNode:
    """One `ray start ... --block` in its own session; `stop()` ends it and its session by PID."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path):
        self.name, self.argv, self.log = name, argv, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, env=env, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> dict[int, str]:
        """SIGTERM `ray start` (it stops its raylet, agents and workers), then SIGKILL by PID whatever of
        its session is left; returns what could not be stopped (pid -> command line)."""
        family = process_family({self.pid})
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(pid_alive(p) for p in family | process_family({self.pid})):
            if not self.alive():
                family |= process_family({self.pid})
            time.sleep(0.3)
        for _ in range(3):
            family |= process_family({self.pid})
            left = [p for p in family if pid_alive(p)]
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return {p: cmdline(p) for p in family if pid_alive(p)}

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class TwoNodeCluster:
    address: str  # GCS address of the head, what MARC_RAY_ADDRESS is set to
    dashboard: str  # http://127.0.0.1:PORT, Ray's dashboard and state API
    temp_dir: Path
    nodes: list[RayNode] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def state(self, kind: str, **params) -> list[dict]:
        """Ray's state API (what `ray list tasks|actors|nodes --detail` shows), all pages of `kind`."""
        session = requests.Session()
        session.trust_env = False
        try:
            response = session.get(f"{self.dashboard}/api/v0/{kind}",
                                   params={"limit": 10000, "detail": 1, "timeout": 60, **params}, timeout=90)
            response.raise_for_status()
            payload = response.json()
        finally:
            session.close()
        assert payload["result"], payload.get("msg")
        return payload["data"]["result"]["result"]

    def node_labels(self) -> dict[str, str]:
        """node id -> the custom resource label it was started with (HEAD_LABEL or NODE2_LABEL)."""
        labels = {}
        for node in self.state("nodes"):
            if node["state"] != "ALIVE":
                continue
            found = [label for label in (HEAD_LABEL, NODE2_LABEL) if label in node["resources_total"]]
            if found:
                labels[node["node_id"]] = found[0]
        return labels

    def stop(self) -> dict[int, str]:
        left: dict[int, str] = {}
        for node in reversed(self.nodes):  # the joined node first, the head last
            left.update(node.stop())
        return left


def _wait(what: str, check, timeout: float, nodes: list[RayNode]) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for node in nodes:
            if not node.alive():
                raise RuntimeError(f"{node.name} exited while waiting for {what}:\n{node.log_tail()}")
        try:
            if check():
                return
        except (requests.RequestException, subprocess.TimeoutExpired, RuntimeError, KeyError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n"
                               + "\n".join(f"--- {n.name}\n{n.log_tail()}" for n in nodes))
        time.sleep(2)


def start_cluster(temp_dir: Path, logs: Path, timeout: float = 300) -> TwoNodeCluster:
    """Head (HEAD_CPUS CPUs, resource HEAD_LABEL) and a second node (NODE2_CPUS, NODE2_LABEL), both on
    127.0.0.1 with every port chosen free; returns once both nodes are alive in the dashboard."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    port, dashboard_port = free_port(), free_port()
    env = {**os.environ, **RAY_ENV, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           # The head's metrics ports have fixed defaults (44217, 44227): free ones, as infra/stack.py does.
           "AUTOSCALER_METRIC_PORT": str(free_port()), "DASHBOARD_METRIC_PORT": str(free_port())}
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    common = ["--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--object-store-memory", str(10**9),
              "--block"]
    head_argv = [str(BIN / "ray"), "start", "--head", "--port", str(port), "--num-cpus", str(HEAD_CPUS),
                 "--resources", json.dumps({HEAD_LABEL: 1}), "--include-dashboard=true",
                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                 "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
                 "--temp-dir", str(temp_dir), *common]
    cluster = TwoNodeCluster(address=f"127.0.0.1:{port}", dashboard=f"http://127.0.0.1:{dashboard_port}",
                             temp_dir=temp_dir, env=env)
    try:
        cluster.nodes.append(RayNode("ray head", head_argv, env, logs / "ray-head.log"))
        _wait("the Ray head's dashboard", lambda: len(cluster.node_labels()) == 1, timeout, cluster.nodes)
        join_argv = [sys.executable, "-c", _JOIN, "start", "--address", cluster.address,
                     "--num-cpus", str(NODE2_CPUS), "--resources", json.dumps({NODE2_LABEL: 1}),
                     "--dashboard-agent-listen-port", str(free_port()), *common]
        cluster.nodes.append(RayNode("ray node2", join_argv, env, logs / "ray-node2.log"))
        _wait("the second node to join", lambda: sorted(cluster.node_labels().values()) == [HEAD_LABEL, NODE2_LABEL],
              timeout, cluster.nodes)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def spread_preset(folder: Path) -> Path:
    """tests/presets/ci-tiny.yaml with `train.placement_strategy: SPREAD` (one training worker per node)."""
    raw = yaml.safe_load(CI_TINY.read_text())
    raw["name"] = "ci-tiny-spread"
    raw["description"] = "ci-tiny with the training workers spread over the Ray cluster's nodes."
    raw["train"] = {**raw["train"], "placement_strategy": "SPREAD"}
    path = folder / "ci-tiny-spread.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def mlflow_api(uri: str, path: str, payload: dict | None = None, params: dict | None = None) -> dict:
    session = requests.Session()
    session.trust_env = False
    try:
        if payload is not None:
            response = session.post(f"{uri}/api/2.0/mlflow/{path}", json=payload, timeout=30)
        else:
            response = session.get(f"{uri}/api/2.0/mlflow/{path}", params=params, timeout=30)
        response.raise_for_status()
        return response.json()
    finally:
        session.close()


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@dataclass
class TwoNodeRun:
    cluster: TwoNodeCluster
    stack: PrivateStack
    preset: Path
    watch: subprocess.CompletedProcess
    pipeline_s: float  # wall time of `prefect deployment run marc/full-pipeline --watch`
    experiment_id: str = ""
    parent: dict = field(default_factory=dict)  # the MLflow parent run of the flow run
    children: dict[str, dict] = field(default_factory=dict)  # stage -> nested MLflow run
    flow_run_id: str = ""

    @property
    def home(self) -> Path:
        return self.stack.home

    @property
    def mlflow_uri(self) -> str:
        return self.stack.env["MLFLOW_TRACKING_URI"]

    @property
    def prefect_api(self) -> str:
        return self.stack.env["PREFECT_API_URL"]


@pytest.fixture(scope="session")
def two_node_run():
    """One `marc/full-pipeline` run (ci-tiny, train SPREAD) through a private stack on a two-node Ray."""
    stack = PrivateStack("so-")
    cluster = None
    try:
        t0 = time.monotonic()
        cluster = start_cluster(stack.home / "ray", stack.home / "logs")
        print(f"\ntwo-node Ray up in {time.monotonic() - t0:.0f} s at {cluster.address}, dashboard {cluster.dashboard}")
        stack.base_env.update(RAY_ENV)
        stack.base_env["MARC_RAY_ADDRESS"] = cluster.address  # external: `marc up` does not start a Ray
        stack.base_env.pop("MARC_RAY_PORT", None)
        t0 = time.monotonic()
        stack.up()
        assert "ray" not in stack.pids(), f"`marc up` started a Ray despite MARC_RAY_ADDRESS: {stack.pids()}"
        print(f"marc up (Prefect, worker, MLflow) in {time.monotonic() - t0:.0f} s")
        preset = spread_preset(stack.home)
        t0 = time.monotonic()
        watch = stack(str(BIN / "prefect"), "deployment", "run", "marc/full-pipeline", "--param", f"preset={preset}",
                      "--watch", check=False, timeout=3600)
        run = TwoNodeRun(cluster, stack, preset, watch, time.monotonic() - t0)
        print(f"marc/full-pipeline on two nodes in {run.pipeline_s:.0f} s (exit {watch.returncode})")
        uri = run.mlflow_uri
        run.experiment_id = mlflow_api(uri, "experiments/get-by-name",
                                       params={"experiment_name": "marc"})["experiment"]["experiment_id"]
        runs = mlflow_api(uri, "runs/search", {"experiment_ids": [run.experiment_id],
                                               "max_results": 1000}).get("runs", [])
        parents = [r for r in runs if tags(r).get("marc.kind") == "pipeline"]
        if parents:
            run.parent = parents[0]
            run.flow_run_id = tags(run.parent).get("prefect.flow_run_id", "")
            run.children = {tags(r)["marc.stage"]: r for r in runs
                            if tags(r).get("mlflow.parentRunId") == run.parent["info"]["run_id"]}
        yield run
    finally:
        failures = []
        try:
            stack.close()
        except AssertionError as exc:
            failures.append(str(exc))
        if cluster is not None:
            left = cluster.stop()
            if left:
                failures.append(f"Ray processes left after stopping the cluster: {left}")
        assert not failures, "\n".join(failures)
