"""How work in flight is cut into tasks (`InFlight.batches`), with the real router on a
real Redis and no workers (so every batch goes to its pool's shared queue): what goes,
what waits, and that the bookkeeping empties as the work is answered."""

import pytest

from cord.common.config import HOLD_S, SchedulingSpec
from cord.common.keys import Keys, queue_name
from cord.coordinator.inflight import Batch, InFlight
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.routing import Router
from cord.coordinator.search import make_search
from cord.lab.arith import make_problems

pytestmark = [pytest.mark.redis]


def fresh(cfg, redis_client) -> tuple[Router, InFlight]:
    """A router and an empty `InFlight` on the run's namespace."""
    router = Router(cfg, redis_client, Keys(cfg.namespace))
    return router, InFlight(cfg, redis_client, Keys(cfg.namespace), router)


def start_problems(inflight: InFlight, cfg, n: int, seed: int, now: float) -> None:
    for p in make_problems(n, seed=seed):
        problem = Problem(**p.to_json())
        inflight.add(problem.id, make_search(problem, cfg).start().work, now)


def per_queue(batches: list[Batch]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for b in batches:
        out.setdefault(b.queue, []).append(len(b.keys))
    return out


def send(inflight: InFlight, batches: list[Batch], now: float) -> list[str]:
    ids = [f"task-{now}-{i}" for i in range(len(batches))]
    for b, task_id in zip(batches, ids, strict=True):
        inflight.sent(b, task_id, now)
    return ids


def test_partial_batches_wait_only_while_other_tasks_are_out(make_config, redis_client):
    _, cfg = make_config()  # a problem's first step: one item per teacher
    router, inflight = fresh(cfg, redis_client)
    teachers = [queue_name(cfg.namespace, "expand", t) for t in cfg.teacher_names]
    assert len(teachers) == 3

    # Nothing is out: a partial batch goes at once (nothing more could come).
    start_problems(inflight, cfg, 1, seed=1, now=0.0)
    first = inflight.batches(0.0, router.route)
    assert per_queue(first) == {q: [1] for q in teachers}
    assert inflight.waiting() == 0
    first_ids = send(inflight, first, 0.0)

    # Those three tasks are out. More work for the same pools waits for more of its
    # kind (each pool has a task out and one worker's worth of room), up to HOLD_S.
    start_problems(inflight, cfg, 3, seed=2, now=1.0)
    assert inflight.batches(1.0, router.route) == []
    assert inflight.waiting() == 9  # 3 problems x 3 teachers
    held = inflight.batches(1.0 + HOLD_S + 0.01, router.route)
    assert per_queue(held) == {q: [3] for q in teachers}
    held_ids = send(inflight, held, 1.3)

    # A full batch never waits, and its remainder waits as a partial one does.
    size = cfg.pool("alpha").max_batch
    start_problems(inflight, cfg, size + 2, seed=3, now=2.0)
    full = inflight.batches(2.0, router.route)
    assert per_queue(full) == {q: [size] for q in teachers}
    assert inflight.waiting() == 3 * 2
    full_ids = send(inflight, full, 2.0)
    assert inflight.sizes()["tasks"] == 9

    # Answered tasks leave; once every item is settled or forgotten, nothing is left.
    for task_id in first_ids + held_ids + full_ids:
        for key in inflight.task_keys(task_id):
            assert inflight.settle(key) is not None
        assert inflight.task_keys(task_id) == [] and inflight.close(task_id) == []
    assert inflight.sizes()["tasks"] == 0 and inflight.waiting() == 6
    for pid in {p.pid for p in list(inflight.pending.values())}:
        inflight.forget(pid)
    assert inflight.empty, inflight.sizes()


def test_a_requeued_item_leaves_its_task_and_a_late_result_still_counts(make_config, redis_client):
    _, cfg = make_config()
    router, inflight = fresh(cfg, redis_client)
    start_problems(inflight, cfg, 1, seed=4, now=0.0)
    (task_id, *_) = send(inflight, inflight.batches(0.0, router.route), 0.0)
    (key,) = inflight.task_keys(task_id)
    p = inflight.requeue(key, 5.0)  # its worker was lost: sent again, an attempt counted
    assert p.attempt == 2 and p.task is None and inflight.waiting() == 1
    assert task_id not in inflight.tasks  # the lost task carries nothing: it is gone
    assert inflight.batches(5.0, router.route) == []  # others are out: it waits HOLD_S
    (again,) = inflight.batches(5.0 + HOLD_S, router.route)
    assert again.keys == [key]
    assert again.attempt == 2
    send(inflight, [again], 5.0)
    # The lost task's worker answers late after all: the first result wins ...
    assert inflight.settle(key) is not None
    # ... and the re-sent task's answer is then a duplicate.
    assert inflight.settle(key) is None
    assert inflight.sizes()["tasks"] == 2  # the other two teachers' tasks


def test_a_late_result_of_an_item_waiting_to_be_sent_again_settles_it(make_config, redis_client):
    """Its worker was taken for lost and the item went back to the outbox; the first task
    answers before the item is sent again: it is owed nothing, and never sent."""
    _, cfg = make_config()
    router, inflight = fresh(cfg, redis_client)
    start_problems(inflight, cfg, 1, seed=4, now=0.0)
    (task_id, *_) = send(inflight, inflight.batches(0.0, router.route), 0.0)
    (key,) = inflight.task_keys(task_id)
    inflight.requeue(key, 5.0)
    assert inflight.waiting() == 1
    assert inflight.settle(key) is not None
    assert inflight.waiting() == 0
    assert inflight.batches(5.0 + 2 * HOLD_S, router.route) == []


def test_without_a_hold_partial_batches_go_at_once(make_config, redis_client):
    """A pool behind a server that batches continuously holds nothing back: the same
    work that waits above goes at once (``scheduling.hold_s`` 0, its default there)."""
    _, cfg = make_config()
    cfg = cfg.model_copy(update={"scheduling": SchedulingSpec(hold_s=0.0)})
    router, inflight = fresh(cfg, redis_client)
    teachers = [queue_name(cfg.namespace, "expand", t) for t in cfg.teacher_names]
    start_problems(inflight, cfg, 1, seed=1, now=0.0)
    send(inflight, inflight.batches(0.0, router.route), 0.0)
    start_problems(inflight, cfg, 3, seed=2, now=1.0)
    assert per_queue(inflight.batches(1.0, router.route)) == {q: [3] for q in teachers}
    assert inflight.waiting() == 0


def test_dropped_items_are_owed_nothing_sent_or_not(make_config, redis_client):
    """A search that stops waiting for items (a straggler cut): one already sent, one
    still in the outbox. Neither is sent again nor owed; a result that still comes is
    late; the bookkeeping empties with the rest of the work."""
    _, cfg = make_config()
    router, inflight = fresh(cfg, redis_client)
    start_problems(inflight, cfg, 1, seed=5, now=0.0)
    (sent_task, *others) = send(inflight, inflight.batches(0.0, router.route), 0.0)
    (sent_key,) = inflight.task_keys(sent_task)
    start_problems(inflight, cfg, 1, seed=6, now=1.0)  # held: three tasks are out
    assert inflight.waiting() == 3
    waiting_key = next(k for k, p in inflight.pending.items() if p.task is None)
    inflight.drop(sent_key)
    inflight.drop(waiting_key)
    inflight.drop(waiting_key)  # twice: nothing more happens
    assert sent_task not in inflight.tasks and inflight.waiting() == 2
    assert inflight.settle(sent_key) is None  # its result comes late: not owed
    later = inflight.batches(1.0 + 2 * HOLD_S, router.route)
    assert sorted(k for b in later for k in b.keys) == sorted(
        k for k, p in inflight.pending.items() if p.task is None
    )
    assert waiting_key not in {k for b in later for k in b.keys}
    send(inflight, later, 2.0)
    for task_id in [*others, *(t for t in list(inflight.tasks) if t not in others)]:
        for key in inflight.task_keys(task_id):
            assert inflight.settle(key) is not None
    assert inflight.empty, inflight.sizes()
