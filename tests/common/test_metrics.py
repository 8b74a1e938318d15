"""The /metrics endpoint helper: free ports, a taken port moving to the next one."""

from __future__ import annotations

import errno
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from cord.common.metrics import hit_share, serve


def test_serve_takes_the_next_port_when_one_is_taken():
    registry = CollectorRegistry()
    Counter("cord_test_things", "Things.", registry=registry).inc(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as err:
            serve(registry, port, tries=1)
        assert err.value.errno == errno.EADDRINUSE and "metrics" in str(err.value)
        server = serve(registry, port, tries=20)
    try:
        assert port < server.port < port + 20
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics").read().decode()
        assert "cord_test_things_total 3.0" in body
    finally:
        server.close()


def test_port_zero_is_any_free_port():
    server = serve(CollectorRegistry(), 0)
    try:
        assert server.port > 0
    finally:
        server.close()


def test_hit_share():
    assert hit_share(0, 0) == 0.0
    assert hit_share(30, 120) == 0.25
