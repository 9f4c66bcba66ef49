"""Shared test helpers: where the shared real-video material lives; processes, sockets and a
private stack for the tests that start one (independent of infra/stack.py's own /proc code)."""

from __future__ import annotations

import ipaddress
import json
import os

# Triton binds the interpreter mode when it is first imported, and any test module importing the
# model stack imports it (stages.model.runner -> compression). test_compression.py runs the kernels
# on CPU tensors in the interpreter, so the mode is set here, before any test module is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
REAL_VIDEOS = SHARED / "data" / "real"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def real_videos() -> Path:
    assert REAL_VIDEOS.is_dir(), f"real test videos expected at {REAL_VIDEOS} (../shared beside the checkout)"
    return REAL_VIDEOS


# ----------------------------------------------------------------------------------------------
# Processes (Linux /proc)


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat: [state, ppid, pgrp, session, ...]; None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_family(pids: list[int] | set[int]) -> set[int]:
    """The given pids, their descendants (ppid chains) and members of their sessions."""
    pids = set(pids)
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := proc_stat(int(entry))) is not None:
            table[int(entry)] = (int(fields[1]), int(fields[3]))
    found = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in found or pid not in table:
            continue
        found.add(pid)
        todo += [child for child, (ppid, _) in table.items() if ppid == pid]
    found |= {pid for pid, (_, sid) in table.items() if sid in pids}
    found.discard(os.getpid())
    return found


# ----------------------------------------------------------------------------------------------
# Sockets


def listening_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket (IPv4 and IPv6)."""
    out = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], int(parts[9])
            if state != "0A":  # LISTEN
                continue
            addr_hex, port_hex = local.split(":")
            # /proc prints each 32-bit word in host (little-endian) order.
            raw = b"".join(bytes.fromhex(addr_hex[i:i + 8])[::-1] for i in range(0, width, 8))
            addr = ipaddress.ip_address(raw)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            out[inode] = (str(addr), int(port_hex, 16))
    return out


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def listeners_of(pids: list[int] | set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket held by `pids` and their families."""
    listening = listening_sockets()
    return [(pid, *listening[inode]) for pid in sorted(process_family(pids))
            for inode in socket_inodes(pid) if inode in listening]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# A private stack through the command line, as a user starts it


class PrivateStack:
    """`marc up` under a short MARC_HOME in /tmp (Ray's socket paths must stay short) on free
    ports; `close()` runs `marc down` and fails if any process of the stack is left."""

    def __init__(self, prefix: str):
        self.home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        base = {k: v for k, v in os.environ.items()
                if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MARC_RAY_ADDRESS", "PREFECT_HOME")}
        base.update(MARC_HOME=str(self.home), MARC_PREFECT_PORT=str(free_port()), MARC_MLFLOW_PORT=str(free_port()),
                    MARC_RAY_PORT=str(free_port()), PATH=f"{BIN}:{base.get('PATH', '')}",
                    PREFECT_SERVER_ANALYTICS_ENABLED="false",
                    # Once ~/.ray/auth_token exists (any Ray on the machine may create it), `ray start`
                    # turns token auth on while drivers default to 'disabled' and cannot connect.
                    # Pin one mode for the head and every client (infra/stack.py does not yet).
                    RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
        self.base_env = base
        self.env = dict(base)

    def __call__(self, *cmd: str, check: bool = True, timeout: float = 600, env: dict | None = None):
        proc = subprocess.run(list(cmd), env=env or self.env, cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{shlex.join(cmd)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
        return proc

    def up(self, *flags: str) -> None:
        self(str(BIN / "marc"), "up", *flags, env=self.base_env)
        exports = self(str(BIN / "marc"), "env", env=self.base_env).stdout
        env = dict(self.base_env)
        for line in exports.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0] if value else ""
        self.env = env

    def pids(self) -> dict[str, int]:
        """service -> pid, from MARC_HOME/run/*.pid (JSON written by infra/stack.py)."""
        return {p.stem: json.loads(p.read_text())["pid"] for p in (self.home / "run").glob("*.pid")}

    def record(self, service: str) -> dict:
        return json.loads((self.home / "run" / f"{service}.pid").read_text())

    def close(self) -> None:
        before = process_family(set(self.pids().values()))
        down = self(str(BIN / "marc"), "down", check=False, env=self.base_env)
        deadline = time.monotonic() + 15
        while any(pid_alive(p) for p in before) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {p: cmdline(p) for p in before if pid_alive(p)}
        assert down.returncode == 0, down.stdout + down.stderr
        assert not left, f"marc down left processes behind: {left}"


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs on 127.0.0.1 only, shut down with ray.shutdown() (never `ray stop`)."""
    import shutil
    import tempfile

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is first imported...
        mp.setenv("RAY_SCHEDULER_EVENTS", "0")
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        import ray
        from ray._private import ray_constants

        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # ...which may have happened before this fixture
        temp = tempfile.mkdtemp(prefix="marc-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 107 chars
        try:
            ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING")
            assert ray.util.get_node_ip_address() == "127.0.0.1"
            yield ray
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# One pipeline run on a two-node Ray cluster, shared by test_scale_out.py and test_browser_ui.py

from two_node import two_node_run  # noqa: E402,F401  (a session fixture: registered here so it runs once)


def pytest_collection_modifyitems(config, items):
    """Tests of the shared two-node run go last and together: its stack lives only while they run."""
    items.sort(key=lambda item: "two_node_run" in getattr(item, "fixturenames", ()))
