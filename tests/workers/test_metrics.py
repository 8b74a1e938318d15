"""A worker's token window and task counts (what its heartbeat and /metrics report)."""

from __future__ import annotations

from cord.common.messages import TokenCounts
from cord.workers.metrics import TokenWindow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_window_rate_covers_only_the_last_minute():
    clock = Clock()
    w = TokenWindow(window_s=60, clock=clock)
    clock.now += 120  # serving for two minutes
    w.add(TokenCounts(generated=600))
    clock.now += 30
    w.add(TokenCounts(generated=300, scored=60))
    assert w.per_s() == {"generated": 15.0, "scored": 1.0, "prompt": 0.0, "cached": 0.0}
    clock.now += 45  # the first task is now 75 s old
    assert w.per_s()["generated"] == 5.0
    clock.now += 60
    assert w.per_s()["generated"] == 0.0
    assert w.totals == TokenCounts(generated=900, scored=60)


def test_window_rate_of_a_young_worker_spans_its_uptime():
    clock = Clock()
    w = TokenWindow(window_s=60, clock=clock)
    clock.now += 10
    w.add(TokenCounts(generated=100))
    assert w.per_s()["generated"] == 10.0
    clock.now += 0.2
    young = TokenWindow(window_s=60, clock=clock)
    young.add(TokenCounts(generated=7))
    assert young.per_s()["generated"] == 7.0  # never over less than a second
