"""Command lines that start real ``torchrun`` ranks on this machine, their rendezvous on a free loopback port."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*launch: str) -> list[str]:
    """``torchrun`` with the launcher flags ``launch``, run by this interpreter."""
    return [sys.executable, "-m", "torch.distributed.run", *launch]


def standalone(nproc: int) -> list[str]:
    """torchrun on ``nproc`` local ranks, its rendezvous on a free loopback port."""
    return torchrun("--nnodes", "1", "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
                    "--rdzv_endpoint", f"127.0.0.1:{free_port()}")
