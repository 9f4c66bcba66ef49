"""stages/train/rendezvous.py: rank 0's torch.distributed store listens only on MASTER_ADDR.

Two real processes form a gloo group through env:// (what Ray Train's TorchConfig uses) and all_reduce;
while they wait on a barrier, the test reads the listening sockets of both. Without the patch the store
listens on '::' (the finding of test_security.py); that control is asserted too, so the test would notice
when torch starts binding the host name itself and the patch can go.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import PROJECT_ROOT, free_port, listeners_of
from stages.train.rendezvous import bind_store_to_master_addr, listening_socket

RANK = textwrap.dedent("""
    import os, sys, time
    from datetime import timedelta
    import torch, torch.distributed as dist
    if sys.argv[1] == "patched":
        from stages.train.rendezvous import bind_store_to_master_addr
        bind_store_to_master_addr()
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    print("sum", t.item(), flush=True)
    open(sys.argv[2] + f".{dist.get_rank()}", "w").close()   # the test reads sockets now
    while not os.path.exists(sys.argv[2] + ".done"):
        time.sleep(0.05)
    dist.barrier()
    dist.destroy_process_group()
""")


def _group(tmp_path: Path, mode: str) -> tuple[list[tuple[int, str, int]], list[str], int]:
    """Start 2 ranks; returns the listening sockets of both while the group is up, their outputs, the port."""
    port = free_port()
    flag = str(tmp_path / mode)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "PYTHONPATH": str(PROJECT_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, mode, flag], env={**env, "RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 120
        while not all(Path(f"{flag}.{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate()[0] for p in procs if p.poll() is not None]
            time.sleep(0.05)
        seen = listeners_of({p.pid for p in procs})
        Path(f"{flag}.done").touch()
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    assert [p.returncode for p in procs] == [0, 0], outs
    return seen, outs, port


def test_patched_store_listens_only_on_master_addr_and_the_group_works(tmp_path):
    seen, outs, port = _group(tmp_path, "patched")
    assert all("sum 3.0" in out for out in outs), outs
    store = [s for s in seen if s[2] == port]
    assert store and {addr for _, addr, _ in store} == {"127.0.0.1"}, seen
    assert [s for s in seen if s[1] != "127.0.0.1"] == [], seen


def test_unpatched_store_listens_on_every_interface(tmp_path):
    """The control: what the patch exists for. If this starts failing, torch binds the host itself now."""
    seen, outs, port = _group(tmp_path, "plain")
    assert all("sum 3.0" in out for out in outs), outs
    assert {addr for _, addr, p in seen if p == port} & {"::", "0.0.0.0"}, seen


def test_install_is_idempotent_and_keeps_the_original_for_other_ranks():
    # (`import torch.distributed.rendezvous as m` yields the function of that name, not the module)
    rendezvous = importlib.import_module("torch.distributed.rendezvous")

    before = rendezvous._create_c10d_store
    try:
        bind_store_to_master_addr()
        once = rendezvous._create_c10d_store
        bind_store_to_master_addr()
        assert rendezvous._create_c10d_store is once and once is not before
    finally:
        rendezvous._create_c10d_store = before


def test_a_taken_port_names_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"MASTER_ADDR:MASTER_PORT 127\.0\.0\.1:{port}"):
            listening_socket("127.0.0.1", port)
