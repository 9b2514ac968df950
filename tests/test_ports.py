import socket

from core import ports


def test_free_port_is_outside_the_ranges_the_kernel_and_ray_pick_from_and_can_be_bound():
    for _ in range(20):
        port = ports.free_port("127.0.0.1")
        assert ports.LOW <= port < min(ports.HIGH + 1, ports._ephemeral_low())
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_taken_port_is_not_handed_out(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        busy = taken.getsockname()[1]
        draws = iter([busy, busy, 25_000])
        monkeypatch.setattr(ports, "_ephemeral_low", lambda: 60_000)
        monkeypatch.setattr(ports.random, "randint", lambda a, b: next(draws))
        monkeypatch.setattr(ports, "LOW", 0)  # the busy port lies in the kernel's range
        assert ports.free_port("127.0.0.1") == 25_000


def test_a_host_whose_ephemeral_range_covers_the_gap_gets_the_kernels_pick(monkeypatch):
    monkeypatch.setattr(ports, "_ephemeral_low", lambda: 1_024)
    port = ports.free_port("127.0.0.1")
    assert port > 0
