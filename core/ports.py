"""A free TCP port to hand to a server about to start (a process group's store, Serve's HTTP proxy).

A port the kernel picks (`bind(0)`) lies in its ephemeral range, the range every outgoing connection and
every gRPC server of Ray also draws from: between our check and the server's bind another process can take
it ("Failed to bind to address", seen once in CI). Ports are drawn instead from the gap between Ray's worker
ports (10002-19999 by default) and the kernel's ephemeral range (32768+ on Linux), which nothing picks
on its own."""

from __future__ import annotations

import random
import socket

LOW, HIGH = 20_000, 32_767
"""Drawn from [LOW, HIGH], less the kernel's ephemeral range where a host configured it lower."""


def free_port(host: str = "") -> int:
    """A port that nothing listens on now, outside the kernel's and Ray's automatic ranges."""
    low, high = LOW, min(HIGH, _ephemeral_low() - 1)
    if high <= low:  # a host whose ephemeral range covers the gap: fall back to the kernel's pick
        return _bound(host, 0)
    for _ in range(200):
        port = random.randint(low, high)
        try:
            return _bound(host, port)
        except OSError:  # taken: draw again
            continue
    raise RuntimeError(f"no free TCP port in {low}-{high} after 200 draws on {host or 'all addresses'}")


def _bound(host: str, port: int) -> int:
    with socket.socket() as s:
        s.bind((host, port))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA range starts at 49152
        return 49_152
