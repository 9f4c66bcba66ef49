"""Make rank 0's torch.distributed rendezvous store listen only on MASTER_ADDR.

torch's c10d `TCPStore` server binds its port on every interface (`::`): the host name it is given only tells
clients where to connect. Our rule is that nothing of the stack listens off the address the user chose (by
default 127.0.0.1). So rank 0 binds the listening socket itself, on MASTER_ADDR:MASTER_PORT, and hands it to
the store (`master_listen_fd`, a public TCPStore argument); every other rank is an ordinary client.

    bind_store_to_master_addr()   # in each worker, before init_process_group (idempotent)

The hook is `torch.distributed.rendezvous._create_c10d_store`, the one function the env:// and tcp://
rendezvous handlers call to make the store; it is private, so `test_rendezvous.py` pins its behaviour.
"""

from __future__ import annotations

import importlib
import socket
from datetime import timedelta
from typing import Any

_INSTALLED = "_marc_binds_master_addr"


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on exactly `host:port` (a name, IPv4 or IPv6 address)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on MASTER_ADDR:MASTER_PORT {host}:{port} for the torch.distributed "
                               f"store: {e.strerror}") from e
    return sock


def bind_store_to_master_addr() -> None:
    """Patch this process's torch so that a rank-0 rendezvous store listens only on its host name's address."""
    # (`import torch.distributed.rendezvous as m` yields the function of that name, not the module)
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    from torch.distributed import TCPStore

    original = rendezvous._create_c10d_store
    if getattr(original, _INSTALLED, False):
        return

    def create_store(hostname: str, port: int, rank: int, world_size: int, timeout: timedelta,
                     use_libuv: bool = True) -> Any:
        if rank != 0 or rendezvous._torchelastic_use_agent_store():
            return original(hostname, port, rank, world_size, timeout, use_libuv=use_libuv)
        fd = listening_socket(hostname, port).detach()  # the store owns (and closes) the descriptor
        return TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                        multi_tenant=True, master_listen_fd=fd, use_libuv=use_libuv)

    setattr(create_store, _INSTALLED, True)
    rendezvous._create_c10d_store = create_store
