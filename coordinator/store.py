"""The coordinator's Redis state: problems, the waiting queue, leases of problems in
flight, committed search states, done/failed sets. Multi-key changes are Lua scripts,
so each is atomic."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis

from cord.common.keys import Keys
from cord.coordinator.inputs.problems import Problem

# KEYS: problems, queue; ARGV: id, json ... -> number of new problems
_ENQUEUE = """
local added = 0
for i = 1, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('RPUSH', KEYS[2], ARGV[i])
    added = added + 1
  end
end
return added
"""

# KEYS: queue, inflight; ARGV: owner, lease_until, n -> claimed ids
_CLAIM = """
local out = {}
for i = 1, tonumber(ARGV[3]) do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  local lease = cjson.encode({owner = ARGV[1], ['until'] = tonumber(ARGV[2])})
  redis.call('HSET', KEYS[2], id, lease)
  table.insert(out, id)
end
return out
"""

# KEYS: inflight; ARGV: owner, now, lease_until, n -> ids whose lease expired, now ours.
# Our own expired leases count too: a claim whose reply was lost to a dropped connection
# would otherwise stay ours and unheld for ever.
_TAKEOVER = """
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  if #out >= tonumber(ARGV[4]) then break end
  local lease = cjson.decode(all[i + 1])
  if tonumber(lease['until']) < tonumber(ARGV[2]) then
    local renewed = cjson.encode({owner = ARGV[1], ['until'] = tonumber(ARGV[3])})
    redis.call('HSET', KEYS[1], all[i], renewed)
    table.insert(out, all[i])
  end
end
return out
"""

# KEYS: inflight; ARGV: owner, lease_until, id... -> the ids no longer ours (renewed: the rest)
_RENEW = """
local lost = {}
local lease = cjson.encode({owner = ARGV[1], ['until'] = tonumber(ARGV[2])})
for i = 3, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw and cjson.decode(raw)['owner'] == ARGV[1] then
    redis.call('HSET', KEYS[1], ARGV[i], lease)
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# KEYS: inflight, state, done|failed, finished_at; ARGV: id, now, forget_before -> 1 when
# newly finished. The finish time feeds status's completion rate; an hour of them is kept.
_FINISH = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local new = redis.call('SADD', KEYS[3], ARGV[1])
if new == 1 then
  redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[3])
end
return new
"""
FINISHED_KEEP_S = 3600.0


class Store:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.r = client
        self.keys = keys
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)
        self._takeover = client.register_script(_TAKEOVER)
        self._finish = client.register_script(_FINISH)
        self._renew = client.register_script(_RENEW)

    def enqueue(self, problems: Iterable[Problem], chunk: int = 500) -> int:
        return self.enqueue_stored(((p.id, p.model_dump_json()) for p in problems), chunk)

    def enqueue_stored(
        self, records: Iterable[tuple[str | bytes, str | bytes]], chunk: int = 500
    ) -> int:
        """Problems in their stored form, (id, `Problem` JSON), queued in order; an id
        already known adds nothing. Returns how many were new."""
        k = self.keys
        added = 0
        batch: list[str | bytes] = []
        for pid, stored in records:
            batch += [pid, stored]
            if len(batch) >= 2 * chunk:
                added += int(self._enqueue(keys=[k.problems, k.queue], args=batch))
                batch = []
        if batch:
            added += int(self._enqueue(keys=[k.problems, k.queue], args=batch))
        return added

    def claim(self, owner: str, n: int, lease_s: float) -> list[str]:
        if n <= 0:
            return []
        ids = self._claim(
            keys=[self.keys.queue, self.keys.inflight], args=[owner, time.time() + lease_s, n]
        )
        return [i.decode() for i in ids]

    def take_over(self, owner: str, n: int, lease_s: float) -> list[str]:
        """Problems whose owner stopped renewing its lease become ours."""
        if n <= 0:
            return []
        now = time.time()
        ids = self._takeover(keys=[self.keys.inflight], args=[owner, now, now + lease_s, n])
        return [i.decode() for i in ids]

    def renew(self, owner: str, ids: Iterable[str], lease_s: float) -> list[str]:
        """Extend our leases; returns the ids that are no longer ours (another
        coordinator took them over while we could not renew, or they were finished)."""
        ids = list(ids)
        if not ids:
            return []
        lost = self._renew(keys=[self.keys.inflight], args=[owner, time.time() + lease_s, *ids])
        return [i.decode() for i in lost]

    def problems(self, ids: list[str]) -> list[Problem | None]:
        if not ids:
            return []
        raw = self.r.hmget(self.keys.problems, ids)
        return [Problem.model_validate_json(r) if r else None for r in raw]

    def states(self, ids: list[str]) -> list[dict[str, Any] | None]:
        if not ids:
            return []
        raw = self.r.hmget(self.keys.state, ids)
        return [json.loads(r) if r else None for r in raw]

    def commit(self, states: dict[str, dict[str, Any]]) -> None:
        if states:
            mapping: dict[str | bytes, bytes | float | int | str] = {
                k: json.dumps(v) for k, v in states.items()
            }
            self.r.hset(self.keys.state, mapping=mapping)

    def is_finished(self, pid: str) -> bool:
        pipe = self.r.pipeline()
        pipe.sismember(self.keys.done, pid)
        pipe.sismember(self.keys.failed, pid)
        return any(pipe.execute())

    def unfinished(self, ids: Iterable[str]) -> list[str]:
        """Those of `ids` that are in neither the done nor the failed set."""
        ids = list(ids)
        pipe = self.r.pipeline(transaction=False)
        for pid in ids:
            pipe.sismember(self.keys.done, pid)
            pipe.sismember(self.keys.failed, pid)
        flags = pipe.execute()
        return [pid for i, pid in enumerate(ids) if not (flags[2 * i] or flags[2 * i + 1])]

    def finish(self, pid: str, failed: bool = False) -> bool:
        k = self.keys
        target = k.failed if failed else k.done
        now = time.time()
        return bool(
            self._finish(
                keys=[k.inflight, k.state, target, k.finished_at],
                args=[pid, now, now - FINISHED_KEEP_S],
            )
        )

    def release(self, owner: str, ids: Iterable[str]) -> None:
        """Hand problems back on a clean stop: their lease expires at once."""
        lease = json.dumps({"owner": owner, "until": 0})
        mapping: dict[str | bytes, bytes | float | int | str] = dict.fromkeys(ids, lease)
        if mapping:
            self.r.hset(self.keys.inflight, mapping=mapping)

    def holders(self, now: float | None = None) -> tuple[dict[str, int], int]:
        """Problems in flight per coordinator holding a live lease, and the number whose
        lease ran out (their coordinator stopped or died: the next coordinator to run
        resumes them). Reads the whole in-flight hash: for `status`, not the loop."""
        now = time.time() if now is None else now
        held: dict[str, int] = {}
        orphaned = 0
        for raw in self.r.hvals(self.keys.inflight):
            lease = json.loads(raw)
            if float(lease["until"]) >= now:
                held[lease["owner"]] = held.get(lease["owner"], 0) + 1
            else:
                orphaned += 1
        return held, orphaned

    def counts(self) -> dict[str, int]:
        k = self.keys
        pipe = self.r.pipeline()
        pipe.llen(k.queue)
        pipe.hlen(k.inflight)
        pipe.scard(k.done)
        pipe.scard(k.failed)
        pipe.hlen(k.problems)
        queued, inflight, done, failed, total = pipe.execute()
        return {
            "queued": queued,
            "in_flight": inflight,
            "done": done,
            "failed": failed,
            "total": total,
        }
