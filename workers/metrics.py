"""What a worker measures: tokens per model and per task, over the last minute and in
total (published in its heartbeat, which `cord-coord status` sums per pool), and its
Prometheus metrics (``metrics.worker_port`` in the run config).

Counts come from the items of each finished task (`Generation`, `Score`), so every
engine is measured the same way. Everything but the latency histogram is read at
scrape time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import redis
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cord.common.messages import TOKEN_KINDS, TaskKind, TaskResult, TokenCounts
from cord.common.metrics import PORT_TRIES, MetricsServer, hit_share, serve

if TYPE_CHECKING:
    from cord.workers.tasks import WorkerRuntime

WINDOW_S = 60.0
# Task latency: from a tiny scoring batch on a GPU to a long CPU expansion.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class TokenWindow:
    """Token counts of the tasks finished in the last `window_s` seconds, and totals.

    A rate is the window's sum over the window, or over the time since the worker
    started serving when that is shorter (never under a second), so a worker that just
    finished its first task does not report a fraction of its real speed."""

    def __init__(
        self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self._start = clock()
        self._samples: deque[tuple[float, TokenCounts]] = deque()
        self._lock = threading.Lock()  # tasks, the heartbeat and scrapes run in threads
        self._totals = TokenCounts()

    @property
    def totals(self) -> TokenCounts:
        with self._lock:
            return self._totals.model_copy()

    def add(self, counts: TokenCounts) -> None:
        with self._lock:
            now = self._clock()
            self._samples.append((now, counts))
            self._totals.add(counts)
            self._prune(now)

    def per_s(self) -> dict[str, float]:
        """Tokens per second by kind (`TOKEN_KINDS`)."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            span = max(1.0, min(self.window_s, now - self._start))
            sums = TokenCounts()
            for _, counts in self._samples:
                sums.add(counts)
        return {k: getattr(sums, k) / span for k in TOKEN_KINDS}

    def _prune(self, now: float) -> None:
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()


class WorkerMetrics:
    """One worker's numbers: the token window, the latency histogram and a registry
    whose other values are read from the runtime when scraped."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime
        self.window = TokenWindow()
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "cord_worker_task_seconds",
            "Seconds from a task's start to its result (before the reply is sent), by kind.",
            ["model", "kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_RuntimeCollector(runtime, self))
        self.server: MetricsServer | None = None

    def observe(self, kind: TaskKind, result: TaskResult) -> None:
        self.latency.labels(result.model, kind).observe(result.elapsed_s)
        self.window.add(TokenCounts.of(result))

    def heartbeat_fields(self) -> dict[str, Any]:
        """Fields of the heartbeat record (`messages.Heartbeat`): `cord-coord status`
        sums them per pool."""
        rates = self.window.per_s()
        return {
            "tokens": self.window.totals,
            "tokens_per_s_1m": round(rates["generated"], 3),
            "scored_tokens_per_s_1m": round(rates["scored"], 3),
            "metrics_port": self.server.port if self.server else None,
        }

    def start_server(self, port: int, host: str) -> int:
        """Start /metrics on the first free port from `port` (0: any); returns it."""
        self.server = serve(self.registry, port, host, tries=PORT_TRIES)
        return self.server.port


class _RuntimeCollector(Collector):
    def __init__(self, runtime: WorkerRuntime, metrics: WorkerMetrics) -> None:
        self.runtime = runtime
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        rt, model = self.runtime, self.runtime.engine.name
        tasks = CounterMetricFamily(
            "cord_worker_tasks", "Tasks this worker answered.", labels=["model"]
        )
        tasks.add_metric([model], rt.tasks_done)
        yield tasks
        totals = self.metrics.window.totals
        tokens = CounterMetricFamily(
            "cord_worker_tokens",
            "Tokens of answered tasks: generated, scored (reference answers), prompt "
            "(read) and cached (prompt tokens served from the prefix cache).",
            labels=["model", "kind"],
        )
        for kind in TOKEN_KINDS:
            tokens.add_metric([model, kind], getattr(totals, kind))
        yield tokens
        yield _gauge(
            "cord_worker_cache_hit_share",
            "Cached prompt tokens over prompt tokens since the worker started.",
            model,
            hit_share(totals.cached, totals.prompt),
        )
        yield _gauge(
            "cord_worker_tokens_per_second",
            "Generated tokens per second over the last minute.",
            model,
            self.metrics.window.per_s()["generated"],
        )
        yield _gauge("cord_worker_busy", "1 while a task runs.", model, float(rt.busy))
        depth = GaugeMetricFamily(
            "cord_worker_queue_depth",
            "Messages waiting in the queues this worker consumes.",
            labels=["model", "queue"],
        )
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            pipe = rt.redis.pipeline(transaction=False)
            for q in rt.queues:
                pipe.llen(q)
            for q, n in zip(rt.queues, pipe.execute(), strict=True):
                depth.add_metric([model, q], int(n))
        yield depth


def _gauge(name: str, doc: str, model: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc, labels=["model"])
    g.add_metric([model], value)
    return g
