"""How the driver cuts pending work into tasks (`Coordinator._flush`), against a real
Redis broker with no workers: what reaches each pool's queue, and what waits."""

import base64
import json

import pytest
import redis

from cord.common.keys import queue_name
from cord.common.lab.arith import make_problems
from cord.common.problems import Problem
from cord.coordinator.driver import HOLD_S, Coordinator
from cord.coordinator.search import make_search

pytestmark = [pytest.mark.redis]


def queued_items(client: redis.Redis, queue: str) -> list[int]:
    """Items per task message waiting in `queue` (Celery's JSON body: [args, kwargs, ...])."""
    out = []
    for raw in client.lrange(queue, 0, -1):
        body = json.loads(raw)["body"]
        (request,), _, _ = json.loads(base64.b64decode(body))
        out.append(len(request[request["kind"]]))
    return out


def start_problems(coord: Coordinator, n: int, seed: int) -> None:
    for p in make_problems(n, seed=seed):
        problem = Problem(**p.to_json())
        search = make_search(problem, coord.cfg)
        coord.searches[problem.id] = search
        coord._queue(problem.id, search.start())


def test_partial_batches_wait_only_while_other_tasks_are_out(make_config, redis_client, tmp_path):
    _, cfg = make_config()  # a problem's first step: one item per teacher
    coord = Coordinator(cfg, str(tmp_path / "out"))
    teachers = [queue_name(cfg.namespace, "expand", t) for t in cfg.teacher_names]
    meta = queue_name(cfg.namespace, "score", "meta")
    try:
        # Nothing is out: a partial batch goes at once (nothing more could come).
        start_problems(coord, 1, seed=1)
        coord._flush(now=0.0)
        assert len(teachers) == 3
        assert [queued_items(redis_client, q) for q in teachers] == [[1]] * 3
        assert not coord.outbox

        # Those three tasks are out (no worker answers them). More work for the teachers
        # waits for more of its kind, up to HOLD_S, then goes.
        redis_client.delete(*teachers)
        coord._open_tasks.clear()  # the pools themselves are free: only others are out
        start_problems(coord, 3, seed=2)
        queued_at = min(p.queued_at for p in coord.pending.values() if p.sent_at is None)
        coord._flush(now=queued_at)
        assert [redis_client.llen(q) for q in teachers] == [0] * 3
        assert sum(len(v) for v in coord.outbox.values()) == 9  # 3 problems x 3 teachers
        coord._flush(now=queued_at + HOLD_S + 0.01)
        assert [queued_items(redis_client, q) for q in teachers] == [[3]] * 3
        assert not coord.outbox

        # A full batch never waits, and its remainder waits as a partial one does.
        batch = cfg.pool("alpha").max_batch
        redis_client.delete(*teachers)
        coord._open_tasks.clear()
        start_problems(coord, batch + 2, seed=3)  # batch + 2 items for each pool
        now = min(p.queued_at for p in coord.pending.values() if p.sent_at is None)
        coord._flush(now=now)
        assert [queued_items(redis_client, q) for q in teachers] == [[batch]] * 3
        assert [len(v) for v in coord.outbox.values()] == [2] * 3
        assert redis_client.llen(meta) == 0
    finally:
        redis_client.delete(*teachers, meta)
        coord.stop()
