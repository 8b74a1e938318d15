"""Prometheus endpoints of the coordinator and the workers (prometheus_client), and the
free ports they and other local servers (a private Redis, a launched inference server)
listen on.

Both sides build their own `CollectorRegistry` (several runtimes may share one test
process) and serve it with `serve`. Most values are read at scrape time from what the
process already keeps (custom collectors), so the loops pay nothing for being watched.
Ports come from the run config's ``metrics`` section (docs/config.md).
"""

from __future__ import annotations

import errno
import socket
import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

# Several workers of one host (honcho, `cord-coord demo`) each take the next free port.
PORT_TRIES = 100


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `port` is the one actually bound."""

    port: int
    server: Any
    thread: threading.Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve(
    registry: CollectorRegistry, port: int, host: str = "127.0.0.1", tries: int = 1
) -> MetricsServer:
    """Serve `registry` on `host:port`; port 0 takes any free port. With ``tries > 1`` a
    taken port moves on to the next one, up to ``port + tries - 1``."""
    last: OSError | None = None
    for candidate in range(port, port + tries) if port else [0]:
        try:
            server, thread = start_http_server(candidate, addr=host, registry=registry)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            last = e
            continue
        return MetricsServer(int(server.server_address[1]), server, thread)
    raise OSError(
        errno.EADDRINUSE,
        f"no free metrics port in {port}..{port + tries - 1} on {host} "
        f"(metrics.*_port in the run config): {last}",
    )


def hit_share(cached: float, prompt: float) -> float:
    """The share of prompt tokens served from a prefix cache; 0 before any prompt."""
    return cached / prompt if prompt else 0.0


def free_port() -> int:
    """A TCP port nothing listens on now, on this host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
