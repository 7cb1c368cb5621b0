"""A free TCP port for a server that another process binds moments later (`serve run`'s HTTP proxy, a process
group's rendezvous)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS = (10002, 19999)  # Ray's default min_worker_port / max_worker_port


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host now, drawn between Ray's worker ports and the kernel's ephemeral range. A port the
    kernel hands out (a bind to port 0) is where Ray's own processes get theirs too: between the check and the
    server's bind, one of them once took it and `serve run` failed with "Failed to bind"."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(RAY_WORKER_PORTS[1] + 1, low - 1)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:  # in use
                continue
            return port
    raise OSError(f"no free port on {host} between {RAY_WORKER_PORTS[1] + 1} and {low - 1}")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
