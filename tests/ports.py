"""A free port for tests that start servers (Serve's HTTP proxy, Ray's ports, process groups) side by
side: `core.ports.free_port` on the loopback. A module of its own: `from conftest import ...` is ambiguous
where sub-folders have one."""

from core.ports import free_port as _free_port


def free_port() -> int:
    """A port free now on 127.0.0.1, outside the ranges the kernel and Ray pick from."""
    return _free_port("127.0.0.1")
