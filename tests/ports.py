"""A free loopback port, for tests that start servers (Serve's HTTP proxy, Ray's ports, process groups)
side by side. A module of its own: `from conftest import ...` is ambiguous where sub-folders have one."""

import socket


def free_port() -> int:
    """A port free now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
