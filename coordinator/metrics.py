"""The coordinator's Prometheus metrics (``metrics.coordinator_port`` in the run config).

A custom collector reads, at scrape time, what the coordinator already keeps (its
`Counters`, its searches, work in flight and step count) and the run's
Redis keys (problems by state, queue depth per pool), so the driver loop does no work
for being watched. `serve_coordinator` starts the endpoint beside `Coordinator.run`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cord.common.metrics import PORT_TRIES, MetricsServer, serve
from cord.common.redisconn import connect
from cord.coordinator.status import queue_depths
from cord.coordinator.store import Store

if TYPE_CHECKING:
    from cord.coordinator.driver import Coordinator


class CoordinatorCollector(Collector):
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        # Its own connection: scrapes run in the HTTP server's threads.
        self.redis = connect(coord.cfg.redis_url, socket_timeout=5)

    def collect(self) -> Iterator[Metric]:
        yield from self._own()
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            yield from self._from_redis()

    def _own(self) -> Iterator[Metric]:
        """This coordinator's own counts, since it started."""
        c = self.coord.counters
        problems = CounterMetricFamily(
            "cord_coord_problems",
            "Problems this coordinator closed, by outcome (a row in traces or failed).",
            labels=["outcome"],
        )
        problems.add_metric(["done"], c.done)
        problems.add_metric(["failed"], c.failed)
        yield problems
        yield _counter(
            "cord_coord_steps",
            "Search steps committed to Redis (CoRD: beam steps; MCTS: tree expansions; "
            "curation: whole trajectories written).",
            self.coord.counters.steps,
        )
        yield _counter("cord_coord_tasks_sent", "Celery tasks sent.", c.tasks_sent)
        items = CounterMetricFamily(
            "cord_coord_items_sent", "Work items sent, by kind.", labels=["kind"]
        )
        for kind, n in dict(c.by_kind).items():
            items.add_metric([kind], n)
        yield items
        yield _counter(
            "cord_coord_redispatched", "Items sent again (lost worker, timeout).", c.redispatched
        )
        yield _counter(
            "cord_coord_late_results", "Results for items already settled, ignored.", c.late_results
        )
        yield _counter("cord_coord_results", "Task results read from the reply stream.", c.results)
        yield _counter(
            "cord_coord_resumed", "Problems taken over from a dead coordinator.", c.resumed
        )
        yield _counter("cord_coord_redis_outages", "Redis outages waited out.", c.redis_outages)
        yield _gauge(
            "cord_coord_problems_driving",
            "Problems this coordinator drives now (searches in memory).",
            len(self.coord.searches),
        )
        yield _gauge(
            "cord_coord_items_pending",
            "Work items sent or waiting to be sent, not yet answered.",
            self.coord.inflight.sizes()["pending"],
        )

    def _from_redis(self) -> Iterator[Metric]:
        """The run's numbers, whoever drives it: problems by state, queue depths."""
        counts = Store(self.redis, self.coord.keys).counts()
        state = GaugeMetricFamily(
            "cord_problems", "Problems of the run by state (all coordinators).", labels=["state"]
        )
        for name in ("queued", "in_flight", "done", "failed"):
            state.add_metric([name], counts[name])
        yield state
        depth = GaugeMetricFamily(
            "cord_queue_depth",
            "Tasks waiting per pool (its shared queue and its workers' private ones).",
            labels=["model"],
        )
        for model, per in queue_depths(self.redis, self.coord.cfg).items():
            depth.add_metric([model], sum(per.values()))
        yield depth


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def serve_coordinator(coord: Coordinator, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve the coordinator's metrics on the first free port from `port` (0: any), so
    that two coordinators on one host both serve; the port is logged."""
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(coord))
    server = serve(registry, port, host, tries=PORT_TRIES)
    coord.log.info("metrics_serving", url=f"http://{host}:{server.port}/metrics")
    return server
