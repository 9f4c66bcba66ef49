"""The local stack (infra/stack.py): real Prefect, MLflow and Ray processes on 127.0.0.1.

The integration tests start the stack once (module fixture) under a short temporary MARC_HOME
(Ray's Unix socket paths must stay short) on free ports, and always stop it again.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from conftest import listeners_of, pid_alive as _exists, process_family
from infra import prefect_setup, stack

EXTERNAL_VARS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MARC_RAY_ADDRESS")


# ----------------------------------------------------------------------------------------------
# helpers (independent of infra/stack.py's own /proc code)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _short_home() -> Path:
    return Path(tempfile.mkdtemp(prefix="mh-", dir="/tmp"))


def _rss_mb(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _isolate(mp: pytest.MonkeyPatch, home: Path) -> dict[str, int]:
    ports = {"MARC_PREFECT_PORT": _free_port(), "MARC_MLFLOW_PORT": _free_port(), "MARC_RAY_PORT": _free_port()}
    mp.setenv("MARC_HOME", str(home))
    for var, port in ports.items():
        mp.setenv(var, str(port))
    for var in EXTERNAL_VARS + ("PREFECT_HOME",):
        mp.delenv(var, raising=False)
    return ports


# ----------------------------------------------------------------------------------------------
# the running stack


@pytest.fixture(scope="module")
def running_stack():
    home = _short_home()
    with pytest.MonkeyPatch.context() as mp:
        ports = _isolate(mp, home)
        try:
            started = time.monotonic()
            status = stack.up()
            startup_s = time.monotonic() - started
            pids = {s.name: s.pid for s in status.services}
            print(f"\nstack up in {startup_s:.1f} s; RSS (MB) per service incl. children: "
                  + ", ".join(f"{name} {_rss_mb(process_family([pid])):.0f}" for name, pid in pids.items()))
            yield SimpleNamespace(home=home, ports=ports, status=status, pids=pids, startup_s=startup_s)
        finally:
            stack.down()
            recorded = [json.loads(p.read_text())["pid"] for p in (home / "run").glob("*.pid")]
            shutil.rmtree(home, ignore_errors=True)
            assert not recorded, f"pid files left after down(): {recorded}"


@pytest.mark.integration
def test_up_starts_all_services_healthy(running_stack):
    status = running_stack.status
    assert [s.name for s in status.services] == list(stack.SERVICES)
    for service in status.services:
        assert service.running, service
        assert service.pid and _exists(service.pid), service
        assert not service.external
        assert service.log is not None and service.log.exists()

    env = status.env
    ports = running_stack.ports
    assert env["PREFECT_API_URL"] == f"http://127.0.0.1:{ports['MARC_PREFECT_PORT']}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['MARC_MLFLOW_PORT']}"
    assert env["MARC_RAY_ADDRESS"] == f"127.0.0.1:{ports['MARC_RAY_PORT']}"
    assert env["MARC_HOME"] == str(running_stack.home)
    assert env["PREFECT_HOME"] == str(running_stack.home / "prefect")
    assert env == stack.client_env()

    assert requests.get(env["PREFECT_API_URL"] + "/health", timeout=5).json() is True
    assert requests.get(env["MLFLOW_TRACKING_URI"] + "/health", timeout=5).status_code == 200
    pool = requests.get(f"{env['PREFECT_API_URL']}/work_pools/{stack.WORK_POOL}", timeout=5)
    assert pool.status_code == 200 and pool.json()["type"] == "process"
    # The automation that marks a `marc` flow run whose process died as Crashed (test_faults.py sees it act).
    automations = requests.post(f"{env['PREFECT_API_URL']}/automations/filter", json={}, timeout=5).json()
    zombie = [a for a in automations if a["name"] == prefect_setup.ZOMBIE_AUTOMATION]
    assert len(zombie) == 1 and zombie[0]["enabled"], automations
    assert zombie[0]["trigger"]["within"] == 300.0 and zombie[0]["trigger"]["posture"] == "Proactive", zombie
    assert zombie[0]["actions"][0]["type"] == "change-flow-run-state", zombie

    # A Ray driver connects with nothing but the client env.
    probe = ("import json, os, ray; ray.init(address=os.environ['MARC_RAY_ADDRESS'], logging_level='ERROR');"
             "print('RES=' + json.dumps(ray.cluster_resources())); ray.shutdown()")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | stack.client_env()
    proc = subprocess.run([sys.executable, "-c", probe], env=child_env, capture_output=True, text=True, timeout=120)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RES=")), None)
    assert line, proc.stderr[-2000:]
    assert json.loads(line[4:])["CPU"] >= 1

    # State lives under MARC_HOME; env.sh exports the client env.
    home = running_stack.home
    assert (home / "prefect" / "prefect.db").exists()
    assert (home / "mlflow" / "mlflow.db").exists()
    assert (home / "run" / "stack.json").exists()
    env_sh = (home / "env.sh").read_text()
    for key, value in env.items():
        assert f"export {key}={value}" in env_sh


@pytest.mark.integration
def test_up_again_starts_nothing(running_stack):
    before = {name: pid for name, pid in running_stack.pids.items()}
    again = stack.up()
    assert {s.name: s.pid for s in again.services} == before
    now = stack.status()
    assert {s.name: (s.pid, s.running) for s in now.services} == {name: (pid, True) for name, pid in before.items()}
    assert now.env == running_stack.status.env


@pytest.mark.integration
def test_services_listen_on_loopback_only(running_stack):
    seen = listeners_of(list(running_stack.pids.values()))
    ports = {port for _, _, port in seen}
    assert set(running_stack.ports.values()) <= ports, seen
    assert all(addr == "127.0.0.1" for _, addr, _ in seen), [s for s in seen if s[1] != "127.0.0.1"]


@pytest.mark.integration
def test_port_in_use_raises_and_starts_nothing(running_stack):
    home = _short_home()
    try:
        with pytest.MonkeyPatch.context() as mp:
            ports = _isolate(mp, home)
            port = ports["MARC_PREFECT_PORT"]
            with socket.socket() as blocker:
                blocker.bind(("127.0.0.1", port))
                blocker.listen()
                with pytest.raises(stack.PortInUseError, match=rf"port {port} \(prefect server\).*MARC_PREFECT_PORT"):
                    stack.up()
            assert list((home / "run").glob("*.pid")) == []
            assert _processes_mentioning(str(home)) == []
            assert not any(s.running for s in stack.status().services)
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.integration
def test_down_stops_every_process(running_stack):
    pids = list(running_stack.pids.values())
    family = process_family(pids)
    assert len(family) > len(pids)  # Ray and MLflow have children
    status = stack.down()
    assert not any(s.running or s.pid for s in status.services), status
    deadline = time.monotonic() + 10
    while any(_exists(pid) for pid in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [pid for pid in family if _exists(pid)] == []
    assert list((running_stack.home / "run").glob("*.pid")) == []
    assert not any(s.running for s in stack.status().services)
    # Ports are free again.
    assert all(stack._port_free(port) for port in running_stack.ports.values())


# ----------------------------------------------------------------------------------------------
# without services


def test_stale_pid_file_is_removed_not_killed(monkeypatch, tmp_path):
    monkeypatch.setenv("MARC_HOME", str(tmp_path))
    for var in EXTERNAL_VARS:
        monkeypatch.delenv(var, raising=False)
    run = tmp_path / "run"
    run.mkdir()
    # This very process, with a start time that is not its own: a reused pid.
    record = {"name": stack.MLFLOW, "pid": os.getpid(), "starttime": 1, "boot_id": stack._boot_id(),
              "argv": ["mlflow", "server"], "port": 1, "url": "http://127.0.0.1:1", "started_at": 0.0}
    (run / f"{stack.MLFLOW}.pid").write_text(json.dumps(record))
    assert not stack.status().service(stack.MLFLOW).running
    assert not (run / f"{stack.MLFLOW}.pid").exists()
    (run / f"{stack.MLFLOW}.pid").write_text(json.dumps(record))
    stack.down()  # must not signal this process
    assert not (run / f"{stack.MLFLOW}.pid").exists()


def test_client_env_reads_stack_json_and_external_vars_win(monkeypatch, tmp_path):
    monkeypatch.setenv("MARC_HOME", str(tmp_path))
    for var in EXTERNAL_VARS:
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "run").mkdir()
    recorded = {"PREFECT_API_URL": "http://127.0.0.1:4321/api", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5432",
                "MARC_RAY_ADDRESS": "127.0.0.1:6543", "MARC_HOME": str(tmp_path),
                "PREFECT_HOME": str(tmp_path / "prefect"), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_AUTH_MODE": "disabled"}
    (tmp_path / "run" / "stack.json").write_text(json.dumps({"env": recorded}))
    assert stack.client_env() == recorded

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:80")
    monkeypatch.setenv("MARC_RAY_ADDRESS", "10.0.0.5:6379")
    env = stack.client_env()
    assert env["MLFLOW_TRACKING_URI"] == "http://tracking.example:80"
    assert env["MARC_RAY_ADDRESS"] == "10.0.0.5:6379"
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"

    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example/api")
    env = stack.client_env()
    assert env["PREFECT_API_URL"] == "http://prefect.example/api" and "PREFECT_HOME" not in env


def test_client_env_without_stack_json_uses_configured_ports(monkeypatch, tmp_path):
    monkeypatch.setenv("MARC_HOME", str(tmp_path))
    for var in EXTERNAL_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MARC_PREFECT_PORT", "14200")
    monkeypatch.delenv("MARC_MLFLOW_PORT", raising=False)
    monkeypatch.setenv("MARC_RAY_PORT", "16379")
    env = stack.client_env()
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:14200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert env["MARC_RAY_ADDRESS"] == "127.0.0.1:16379"


def test_ray_temp_dir_stays_short(monkeypatch, tmp_path):
    monkeypatch.setenv("MARC_HOME", str(tmp_path / ("x" * 80)))
    temp = stack._ray_temp_dir()
    assert str(temp).startswith("/tmp/marc-ray-") and len(str(temp)) + 64 < 107
    short = _short_home()
    try:
        monkeypatch.setenv("MARC_HOME", str(short))
        assert stack._ray_temp_dir() == short / "ray"
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_require_gpus():
    assert stack.require_gpus("auto", {"CPU": 2.0}) == 0
    assert stack.require_gpus("auto", {"CPU": 2.0, "GPU": 4.0}) == 1
    assert stack.require_gpus(" AUTO ", {"GPU": 1.0}) == 1
    assert stack.require_gpus(0, {"CPU": 2.0}) == 0
    assert stack.require_gpus("2", {"GPU": 2.0}) == 2
    assert stack.require_gpus(1, {"GPU": 8.0}) == 1
    with pytest.raises(RuntimeError, match=r"1 GPU\(s\) requested .* has 0"):
        stack.require_gpus(1, {"CPU": 2.0})
    with pytest.raises(RuntimeError, match="has 2"):
        stack.require_gpus(3, {"GPU": 2.0})
    for bad in ("many", -1, 1.5, True):
        with pytest.raises(ValueError):
            stack.require_gpus(bad, {"GPU": 2.0})


def test_zombie_window_below_two_heartbeats_is_refused(monkeypatch):
    monkeypatch.setenv("MARC_ZOMBIE_AFTER_S", "45")
    with pytest.raises(ValueError, match="MARC_ZOMBIE_AFTER_S=45 must be at least 60 s"):
        prefect_setup.zombie_after_s()
    monkeypatch.setenv("MARC_ZOMBIE_AFTER_S", "60")
    assert prefect_setup.zombie_after_s() == 60
    monkeypatch.delenv("MARC_ZOMBIE_AFTER_S")
    assert prefect_setup.zombie_after_s() == 300
