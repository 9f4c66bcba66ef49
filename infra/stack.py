"""The local service stack: Prefect server + `process` worker, MLflow server, Ray head.

Everything listens on 127.0.0.1 only and keeps its state under `marc_home()`:

    run/<service>.pid    JSON: pid, start time (clock ticks since boot), boot id, argv, port
    run/stack.json       the client env of the running stack (read by `client_env()`)
    logs/<service>.log   stdout + stderr of each service
    prefect/             PREFECT_HOME of the local server (SQLite `prefect.db`)
    mlflow/              `mlflow.db` (SQLite backend store) and `artifacts/` (served by the server)
    ray/                 Ray's temp dir (sessions, logs, sockets), see `_ray_temp_dir()`
    env.sh               `export` lines of `client_env()`, for `source .marc/env.sh`

A service whose address is already given in the environment (PREFECT_API_URL,
MLFLOW_TRACKING_URI, MARC_RAY_ADDRESS) is external: it is not started, only checked. The
Prefect worker is always started here (it runs the flow runs with this checkout as cwd).

Processes are started in their own session (`start_new_session=True`), so a service's process
group id equals its recorded pid. `down()` only signals processes whose recorded pid still has
the recorded start time (a reused pid is never touched); stale pid files are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import requests

from infra import prefect_setup
from infra.home import PROJECT_ROOT, marc_home

WORK_POOL = "marc-local"
HOST = "127.0.0.1"

PREFECT, WORKER, MLFLOW, RAY = "prefect-server", "prefect-worker", "mlflow", "ray"
SERVICES: tuple[str, ...] = (PREFECT, WORKER, MLFLOW, RAY)
"""Service names, as used for pid files, log files and `ServiceStatus.name`."""

DEFAULT_PORTS = {PREFECT: 4200, MLFLOW: 5000, RAY: 6379}
PORT_ENV = {PREFECT: "MARC_PREFECT_PORT", MLFLOW: "MARC_MLFLOW_PORT", RAY: "MARC_RAY_PORT"}
EXTERNAL_ENV = {PREFECT: "PREFECT_API_URL", MLFLOW: "MLFLOW_TRACKING_URI", RAY: "MARC_RAY_ADDRESS"}
CLIENT_KEYS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MARC_RAY_ADDRESS", "MARC_HOME", "PREFECT_HOME",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE")
# RAY_AUTH_MODE is pinned for the local Ray: once any Ray run on the machine has created
# ~/.ray/auth_token, `ray start` turns token auth on while drivers default to off, and they can
# no longer connect ("InvalidAuthToken"). Head, probe, worker and flow runs must agree; the local
# head listens on 127.0.0.1 only, so auth is off.
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is part of the client env while Ray is local: a driver
# without it looks for a raylet on the machine's network address and `ray.init(address=...)`
# hangs (measured: no answer within 120 s) instead of connecting to the 127.0.0.1 node.

START_TIMEOUT_S = float(os.environ.get("MARC_STACK_START_TIMEOUT", "180"))
STOP_TIMEOUT_S = 15.0

# Ray puts Unix sockets at <temp>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store:
# 61 characters after the temp dir with a 4-digit pid; 64 allows a 7-digit pid. A Unix socket
# path must stay under 108 bytes (107 characters); keep a margin.
_RAY_SOCKET_SUFFIX = 64
_SOCKET_PATH_MAX = 107
_SOCKET_MARGIN = 12


class PortInUseError(RuntimeError):
    """A service's port is taken by a program that is not the recorded service."""


@dataclass
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    url: str | None
    external: bool
    log: Path | None
    detail: str = ""


@dataclass
class StackStatus:
    services: list[ServiceStatus]
    env: dict[str, str] = field(default_factory=dict)

    def service(self, name: str) -> ServiceStatus:
        return next(s for s in self.services if s.name == name)


# ----------------------------------------------------------------------------------------------
# Paths and configuration


def _dir(name: str) -> Path:
    path = marc_home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pid_file(name: str) -> Path:
    return _dir("run") / f"{name}.pid"


def _log_file(name: str) -> Path:
    return _dir("logs") / f"{name}.log"


def _stack_file() -> Path:
    return _dir("run") / "stack.json"


def _port(name: str) -> int:
    raw = os.environ.get(PORT_ENV[name], "").strip()
    if not raw:
        return DEFAULT_PORTS[name]
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{PORT_ENV[name]}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise ValueError(f"{PORT_ENV[name]}={port} is not a port number (1-65535)")
    return port


def _external(name: str) -> str | None:
    """The externally given address of a service (env var), or None when it runs here."""
    env = EXTERNAL_ENV.get(name)
    value = os.environ.get(env, "").strip() if env else ""
    return value or None


def _prefect_home() -> Path:
    return _dir("prefect")


def _url(name: str, port: int) -> str:
    if name == PREFECT:
        return f"http://{HOST}:{port}/api"
    if name == MLFLOW:
        return f"http://{HOST}:{port}"
    if name == RAY:
        return f"{HOST}:{port}"
    raise KeyError(name)


def _ray_temp_dir() -> Path:
    """Ray's temp dir: `<home>/ray` when its socket paths stay well below the 107-character limit
    of Unix socket paths; otherwise a short folder under /tmp named after a hash of MARC_HOME
    (one per MARC_HOME, so two stacks never share one)."""
    home = marc_home()
    preferred = home / "ray"
    if len(str(preferred)) + _RAY_SOCKET_SUFFIX <= _SOCKET_PATH_MAX - _SOCKET_MARGIN:
        return preferred
    digest = hashlib.sha1(str(home).encode()).hexdigest()[:12]
    return Path("/tmp") / f"marc-ray-{digest}"


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


# ----------------------------------------------------------------------------------------------
# /proc helpers (Linux): process identity and process trees


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    starttime: int
    state: str


def _read_proc(pid: int) -> _Proc | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is field 3 of proc(5) (state); start time is field 22.
    return _Proc(pid=pid, ppid=int(fields[1]), pgid=int(fields[2]), sid=int(fields[3]),
                 starttime=int(fields[19]), state=fields[0])


def _proc_table() -> dict[int, _Proc]:
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = _read_proc(int(entry))
            if proc is not None:
                table[proc.pid] = proc
    return table


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _reap(pid: int) -> None:
    """Collect a zombie child of this process (the services are our children after `up()`)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int, starttime: int) -> bool:
    """The process `pid` exists, is not a zombie, and is the one that started at `starttime`."""
    _reap(pid)
    proc = _read_proc(pid)
    return proc is not None and proc.starttime == starttime and proc.state not in ("Z", "X")


def _family(leader: int, table: dict[int, _Proc]) -> dict[int, int]:
    """pid -> start time of `leader` and everything it started: descendants by ppid chains plus
    anything still in its process group or session (Ray workers call setpgid and get reparented
    to init when their raylet dies, but keep the session)."""
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found: set[int] = set()
    stack = [leader]
    while stack:
        pid = stack.pop()
        if pid in found or pid not in table:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    found |= {p.pid for p in table.values() if p.sid == leader or p.pgid == leader}
    found.discard(os.getpid())
    return {pid: table[pid].starttime for pid in found}


# ----------------------------------------------------------------------------------------------
# Pid records


@dataclass
class _Record:
    name: str
    pid: int
    starttime: int
    boot_id: str
    argv: list[str]
    port: int | None
    url: str | None
    started_at: float
    cmdline: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def alive(self) -> bool:
        return self.boot_id == _boot_id() and _alive(self.pid, self.starttime)


def _load(name: str) -> _Record | None:
    path = _pid_file(name)
    if not path.exists():
        return None
    try:
        return _Record(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None  # unreadable: treated as stale


def _save(record: _Record) -> None:
    path = _pid_file(record.name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.__dict__, indent=1))
    tmp.replace(path)


def _live_record(name: str) -> _Record | None:
    """The recorded process of `name` if it still runs; a stale pid file is removed."""
    record = _load(name)
    if record is None:
        if _pid_file(name).exists():
            _pid_file(name).unlink(missing_ok=True)
        return None
    if record.alive():
        return record
    _pid_file(name).unlink(missing_ok=True)
    return None


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """Serialize up()/down() of one MARC_HOME across processes."""
    with open(_dir("run") / "stack.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------
# Ports and health checks


def _port_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound (a listener on 0.0.0.0 or :: also makes it fail)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    session = requests.Session()
    # Never send 127.0.0.1 through an HTTP proxy from the environment.
    session.trust_env = not url.startswith(f"http://{HOST}")
    try:
        return session.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False
    finally:
        session.close()


def _split_address(address: str) -> tuple[str, int] | None:
    address = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _healthy(name: str, url: str | None) -> bool:
    if url is None:
        return False
    if name == PREFECT:
        return _http_ok(url.rstrip("/") + "/health")
    if name == MLFLOW:
        return _http_ok(url.rstrip("/") + "/health")
    if name == RAY:
        hostport = _split_address(url)
        return hostport is not None and _tcp_open(*hostport)
    return True


_RAY_PROBE = """
import json, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False, configure_logging=False)
print("MARC_RAY_RESOURCES=" + json.dumps(ray.cluster_resources()))
ray.shutdown()
"""


def ray_probe(address: str, env: dict[str, str] | None = None, timeout: float = 60.0) -> dict:
    """Connect a Ray driver to `address` in a subprocess; return `ray.cluster_resources()`."""
    child_env = {**os.environ, **(env or {}), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = subprocess.run([sys.executable, "-c", _RAY_PROBE, address], env=child_env,
                          capture_output=True, text=True, timeout=timeout, cwd=PROJECT_ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("MARC_RAY_RESOURCES="):
            return json.loads(line.split("=", 1)[1])
    raise RuntimeError(f"Ray at {address} did not answer (exit {proc.returncode}): "
                       f"{(proc.stderr or proc.stdout)[-1500:]}")


def _prefect_workers(api_url: str) -> list[dict]:
    session = requests.Session()
    session.trust_env = not api_url.startswith(f"http://{HOST}")
    try:
        response = session.post(f"{api_url.rstrip('/')}/work_pools/{WORK_POOL}/workers/filter",
                                json={}, timeout=3)
        return response.json() if response.status_code == 200 else []
    except (requests.RequestException, ValueError):
        return []
    finally:
        session.close()


# ----------------------------------------------------------------------------------------------
# Client environment


def _configured_env() -> dict[str, str]:
    """The client env from configuration alone (ports and external addresses)."""
    env = {
        "PREFECT_API_URL": _external(PREFECT) or _url(PREFECT, _port(PREFECT)),
        "MLFLOW_TRACKING_URI": _external(MLFLOW) or _url(MLFLOW, _port(MLFLOW)),
        "MARC_RAY_ADDRESS": _external(RAY) or _url(RAY, _port(RAY)),
        "MARC_HOME": str(marc_home()),
    }
    if not _external(PREFECT):
        env["PREFECT_HOME"] = str(_prefect_home())
    if not _external(RAY):
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        env["RAY_AUTH_MODE"] = "disabled"
    return env


def client_env() -> dict[str, str]:
    """Env vars a client (CLI, tests, flow runs) sets to talk to the running stack.

    Read from `MARC_HOME/run/stack.json` (written by `up()`), else derived from the configured
    ports; PREFECT_API_URL, MLFLOW_TRACKING_URI and MARC_RAY_ADDRESS from the environment win.
    PREFECT_HOME is included only for a local Prefect server, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    only for a local Ray (see CLIENT_KEYS).
    """
    env = _configured_env()
    try:
        recorded = json.loads(_stack_file().read_text()).get("env", {})
    except (OSError, ValueError):
        recorded = {}
    env.update({k: v for k, v in recorded.items() if k in CLIENT_KEYS})
    for name, var in EXTERNAL_ENV.items():
        if _external(name):
            env[var] = _external(name)
    if _external(PREFECT):
        env.pop("PREFECT_HOME", None)
    if _external(RAY):
        env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        env.pop("RAY_AUTH_MODE", None)
    env["MARC_HOME"] = str(marc_home())
    return {k: env[k] for k in CLIENT_KEYS if k in env}


def _write_client_files(env: dict[str, str], extra: dict) -> None:
    stack_file = _stack_file()
    tmp = stack_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"env": env, **extra, "written_at": time.time()}, indent=1))
    tmp.replace(stack_file)
    lines = ["# Written by `marc up` (infra/stack.py): source it to talk to the local stack."]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    (marc_home() / "env.sh").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Starting services


def _base_env(client: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["MARC_HOME"] = client["MARC_HOME"]
    # prefect.yaml's pull step cds here: the process worker runs flows from a temp folder.
    env["MARC_PROJECT_DIR"] = str(PROJECT_ROOT)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if any(k in env for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        for var in ("NO_PROXY", "no_proxy"):
            env[var] = ",".join(filter(None, [env.get(var, ""), HOST, "localhost"]))
    return env


def _spec(name: str, port: int, client: dict[str, str]) -> tuple[list[str], dict[str, str], dict]:
    """argv, env and extra record fields of a service."""
    home = marc_home()
    env = _base_env(client)
    extra: dict = {}
    if name == PREFECT:
        db = _prefect_home() / "prefect.db"
        env.pop("PREFECT_API_URL", None)
        env.update({
            "PREFECT_HOME": str(_prefect_home()),
            # PREFECT_SERVER_DATABASE_CONNECTION_URL is the 3.x name; the older
            # PREFECT_API_DATABASE_CONNECTION_URL is still accepted as an alias.
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}",
        })
        # The UI's API address comes from settings, not from --port: without this the UI of a server on
        # another port than 4200 calls http://127.0.0.1:4200/api ("Can't connect to Server API").
        env.setdefault("PREFECT_UI_API_URL", _url(PREFECT, port))
        argv = [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port), "--analytics-off"]
    elif name == MLFLOW:
        mlflow_dir = _dir("mlflow")
        artifacts = mlflow_dir / "artifacts"
        artifacts.mkdir(exist_ok=True)
        env.pop("MLFLOW_TRACKING_URI", None)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # else ~13 processes and ~2 GB
        # --serve-artifacts is the default in 3.x: new experiments get the `mlflow-artifacts:/`
        # root and clients upload through the server into --artifacts-destination.
        argv = [_bin("mlflow"), "server", "--host", HOST, "--port", str(port),
                "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
                "--artifacts-destination", str(artifacts), "--serve-artifacts", "--workers", "1"]
    elif name == RAY:
        temp_dir = _ray_temp_dir()
        temp_dir.mkdir(parents=True, exist_ok=True)
        # Ray's own fixed defaults (client server 10001, dashboard agent 52365) would clash with
        # a second stack on the machine: pick free ports for them.
        # The same for the metrics ports of the autoscaler (44217) and dashboard (44227); those
        # only log an exception when taken, but the log should stay clean.
        client_port, agent_port = _free_port(), _free_port()
        extra = {"temp_dir": str(temp_dir), "ray_client_port": client_port, "dashboard_agent_port": agent_port}
        env["AUTOSCALER_METRIC_PORT"] = str(_free_port())
        env["DASHBOARD_METRIC_PORT"] = str(_free_port())
        env.update({k: v for k, v in client.items() if k != "MARC_RAY_ADDRESS"})
        env.update({
            "MARC_RAY_ADDRESS": _url(RAY, port),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single node on 127.0.0.1 only (STACK.md)
            "RAY_AUTH_MODE": "disabled",  # see CLIENT_KEYS
            "RAY_SCHEDULER_EVENTS": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            # `ray start --block` drains the node for 30 s on SIGTERM by default.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        })
        argv = [_bin("ray"), "start", "--head", "--port", str(port), "--node-ip-address", HOST,
                "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", str(temp_dir),
                "--ray-client-server-port", str(client_port),
                "--dashboard-agent-listen-port", str(agent_port), "--block"]
    elif name == WORKER:
        env.update(client)  # flow runs inherit the worker's env
        # heartbeats feed the automation that marks a flow run whose process died as Crashed (prefect_setup)
        env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(prefect_setup.FLOW_HEARTBEAT_S))
        worker_name = f"marc-worker-{hashlib.sha1(str(home).encode()).hexdigest()[:8]}"
        extra = {"worker_name": worker_name}
        argv = [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process",
                "--name", worker_name, "--install-policy", "never"]
    else:
        raise KeyError(name)
    return argv, env, extra


def _start(name: str, port: int | None, client: dict[str, str]) -> _Record:
    argv, env, extra = _spec(name, port or 0, client)
    log = _log_file(name)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} marc: {shlex.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    info = _read_proc(proc.pid)
    record = _Record(name=name, pid=proc.pid, starttime=info.starttime if info else 0, boot_id=_boot_id(),
                     argv=argv, port=port, url=_url(name, port) if port else None,
                     started_at=time.time(), extra=extra)
    _save(record)
    return record


def _log_tail(name: str, chars: int = 2000) -> str:
    try:
        return _log_file(name).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _wait_for(name: str, record: _Record | None, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if record is not None and not record.alive():
            raise RuntimeError(f"{name} exited during startup; log {_log_file(name)}:\n{_log_tail(name)}")
        if check():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not become healthy within {timeout:.0f} s; "
                               f"log {_log_file(name)}:\n{_log_tail(name)}")
        time.sleep(0.5)


def _ensure_pool_and_automation(client: dict[str, str]) -> str:
    """Create the `process` work pool WORK_POOL if missing, and the automation that marks flow runs whose
    process died as Crashed (infra/prefect_setup.py); returns 'created' or 'exists' (the pool)."""
    env = {**os.environ, **client, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect_setup.zombie_after_s()  # a bad MARC_ZOMBIE_AFTER_S fails here, with its message
    proc = subprocess.run([sys.executable, "-m", "infra.prefect_setup", WORK_POOL], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = dict(line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith("MARC_"))
    if proc.returncode != 0 or "MARC_POOL" not in lines or "MARC_ZOMBIE" not in lines:
        raise RuntimeError(f"could not set up the work pool {WORK_POOL!r} and the zombie automation on Prefect "
                           f"(exit {proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    outcome, _, pool_type = lines["MARC_POOL"].partition(":")
    if pool_type != "process":
        raise RuntimeError(f"work pool {WORK_POOL!r} exists with type {pool_type!r}, not 'process'; "
                           f"delete it (`prefect work-pool delete {WORK_POOL}`) or use another server")
    return outcome


def up(wait: bool = True) -> StackStatus:
    """Start whatever of the stack is not running; idempotent.

    Ports of all services to start are checked before anything starts (PortInUseError). With
    `wait` (default) it returns once every service is healthy: Prefect and MLflow answer their
    health endpoints, a Ray driver connects, and the worker has registered with the pool. With
    `wait=False` it still waits for Prefect (the pool needs it) but not for the others.
    """
    with _lock():
        client = _configured_env()
        running: dict[str, _Record] = {}
        to_start: list[str] = []
        for name in (PREFECT, MLFLOW, RAY, WORKER):
            if name != WORKER and _external(name):
                continue
            record = _live_record(name)
            if record is not None:
                running[name] = record
                if record.url and name in DEFAULT_PORTS:
                    client[EXTERNAL_ENV[name]] = record.url  # keep the address it runs on
            else:
                to_start.append(name)

        for name in to_start:
            if name in DEFAULT_PORTS and not _port_free(_port(name)):
                port = _port(name)
                raise PortInUseError(
                    f"port {port} ({name.replace('-', ' ')}) is already in use by another program; "
                    f"set {PORT_ENV[name]} to a free port")

        started: dict[str, _Record] = {}
        try:
            for name in (PREFECT, MLFLOW, RAY):
                if name in to_start:
                    started[name] = _start(name, _port(name), client)
            prefect_url = client["PREFECT_API_URL"]
            prefect_record = started.get(PREFECT) or running.get(PREFECT)
            _wait_for(PREFECT, prefect_record, lambda: _healthy(PREFECT, prefect_url), START_TIMEOUT_S)
            pool = _ensure_pool_and_automation(client)
            if WORKER in to_start:
                started[WORKER] = _start(WORKER, None, client)
            if wait:
                for name in (MLFLOW, RAY):
                    record = started.get(name) or running.get(name)
                    url = client[EXTERNAL_ENV[name]]
                    _wait_for(name, record, lambda n=name, u=url: _healthy(n, u), START_TIMEOUT_S)
                if RAY in started:
                    _wait_for(RAY, started[RAY], lambda: _ray_ready(client["MARC_RAY_ADDRESS"]), START_TIMEOUT_S)
                worker = started.get(WORKER) or running[WORKER]
                worker_name = worker.extra.get("worker_name")
                if _external(PREFECT):
                    # An external server may need credentials this module does not send: only
                    # check that the worker stays up for a few seconds.
                    time.sleep(3)
                    _wait_for(WORKER, worker, lambda: True, 0)
                else:
                    _wait_for(WORKER, worker, lambda: _worker_registered(prefect_url, worker_name),
                              START_TIMEOUT_S)
            for record in started.values():
                record.cmdline = _cmdline(record.pid)
                _save(record)
        except BaseException:
            _stop_records(list(started.values()))
            raise

        ray_record = started.get(RAY) or running.get(RAY)
        _write_client_files({k: client[k] for k in CLIENT_KEYS if k in client}, {
            "work_pool": {"name": WORK_POOL, "status": pool},
            "ray": ray_record.extra if ray_record else {"external": True},
            "started": sorted(started),
        })
    return status()


def _ray_ready(address: str) -> bool:
    try:
        return bool(ray_probe(address, env={"RAY_AUTH_MODE": "disabled"}, timeout=60).get("CPU", 0) >= 0)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False


def _worker_registered(api_url: str, worker_name: str | None) -> bool:
    workers = _prefect_workers(api_url)
    return any(w.get("name") == worker_name and w.get("status", "ONLINE") == "ONLINE" for w in workers)


# ----------------------------------------------------------------------------------------------
# Stopping


def _stop_records(records: list[_Record], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM each live record's process group, wait, then SIGKILL what is left; descendants
    that left the group are collected before any signal and killed by PID."""
    table = _proc_table()
    victims: dict[int, int] = {}
    leaders = []
    for record in records:
        if not record.alive():
            continue
        leaders.append(record.pid)
        victims.update(_family(record.pid, table))

    def still_there() -> dict[int, int]:
        return {pid: st for pid, st in victims.items() if _alive(pid, st)}

    def signal_all(sig: int) -> None:
        for leader in leaders:
            proc = _read_proc(leader)
            if proc is not None and proc.pgid == leader and leader in still_there():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(leader, sig)
        # Processes that left the groups (Ray workers call setpgid) get the signal by PID; the
        # others got it from killpg already (a second SIGTERM makes Prefect escalate to SIGKILL).
        for pid in still_there():
            proc = _read_proc(pid)
            if proc is not None and proc.pgid not in leaders:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while still_there() and time.monotonic() < deadline:
        time.sleep(0.2)
    if still_there():
        signal_all(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while still_there() and time.monotonic() < deadline:
            time.sleep(0.1)
    # A raylet may start a worker while the others shut down, after the snapshot above: rescan
    # the sessions we started until nothing of ours is left.
    for _ in range(10):
        table = _proc_table()
        late = {pid: st for leader in leaders for pid, st in _family(leader, table).items()
                if pid not in victims or _alive(pid, st)}
        if not late:
            break
        victims.update(late)
        for pid in late:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while still_there() and time.monotonic() < deadline:
            time.sleep(0.1)
    for record in records:
        _reap(record.pid)
        if not record.alive():
            _pid_file(record.name).unlink(missing_ok=True)


def down() -> StackStatus:
    """Stop every service this MARC_HOME started (only those: pid + start time must match)."""
    with _lock():
        records = []
        for name in SERVICES:
            record = _load(name)
            if record is None or not record.alive():
                _pid_file(name).unlink(missing_ok=True)  # stale: the process is gone or not ours
                continue
            records.append(record)
        _stop_records(records)
        _stack_file().unlink(missing_ok=True)
    return status()


# ----------------------------------------------------------------------------------------------
# Status


def status() -> StackStatus:
    """What runs now; quick (one health request per service, no Ray driver)."""
    env = client_env()
    services = []
    for name in SERVICES:
        external = name != WORKER and _external(name) is not None
        if external:
            url = _external(name)
            ok = _healthy(name, url)
            services.append(ServiceStatus(name, ok, None, url, True, None,
                                          "" if ok else "external service does not answer"))
            continue
        record = _live_record(name)
        log = _log_file(name)
        if record is None:
            services.append(ServiceStatus(name, False, None, _url(name, _port(name)) if name in DEFAULT_PORTS else None,
                                          False, log, "not running"))
            continue
        if name == WORKER:
            ok, detail = True, f"pool {WORK_POOL}"
        else:
            ok = _healthy(name, record.url)
            detail = "" if ok else "process alive but not answering its health check (starting or hung)"
        services.append(ServiceStatus(name, ok, record.pid, record.url, False, log, detail))
    return StackStatus(services=services, env=env)


# ----------------------------------------------------------------------------------------------
# GPUs


def require_gpus(requested: int | str, cluster_resources: dict) -> int:
    """GPUs per task: `"auto"` is 1 where the Ray cluster has a GPU, else 0; an explicit count
    larger than the cluster's GPUs raises at once (Ray would otherwise pend forever)."""
    available = float(cluster_resources.get("GPU", 0) or 0)
    if isinstance(requested, str):
        text = requested.strip().lower()
        if text == "auto":
            return 1 if available >= 1 else 0
        try:
            requested = int(text)
        except ValueError:
            raise ValueError(f"gpus must be 'auto' or a whole number, not {requested!r}") from None
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"gpus must be 'auto' or a whole number >= 0, not {requested!r}")
    if requested > available:
        raise RuntimeError(
            f"{requested} GPU(s) requested per task but the Ray cluster has {available:g} "
            f"(resources: {dict(cluster_resources)}); Ray would wait forever for them. "
            "Set gpus to 'auto' or 0, or point MARC_RAY_ADDRESS at a cluster with GPUs.")
    return requested
