"""A fleet on this machine: a Redis (the one that answers at the config's URL, or one
started here), `cord-worker` processes for the config's pools, and, where asked, a
`cord-coord run` process. The one way the demo, ``eval --start-workers``, the chaos
suite, the benchmarks and the tests start workers.

Every child runs in a session of its own and is stopped as a process tree (SIGTERM, then
SIGKILL after a grace period) when the fleet stops, also on Ctrl-C or an error: use it
as a context manager. A worker counts as ready once its own name is in the registry
(`Keys.workers`), so a record left by an earlier run never stands in for it. Workers
are started as ``python -m cord.workers.cli`` (the benchmarks pass a harness's own
command, the only one allowed to load the `bench` engine): this module imports nothing
of the workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import redis

from cord.common.config import RunConfig, load_config
from cord.common.keys import Keys
from cord.common.redisconn import connect
from cord.coordinator.redis_server import LocalRedis, SentinelGroup

WORKER_COMMAND = (sys.executable, "-m", "cord.workers.cli")
COORDINATOR_COMMAND = (sys.executable, "-m", "cord.coordinator.cli")
STOP_GRACE_S = 20.0  # a worker's warm shutdown (its task finished or handed back), then KILL


class FleetError(RuntimeError):
    """A worker that died while loading, or did not register in time; the message holds
    the end of its log."""


@dataclass
class Child:
    """One process of the fleet, in a session of its own, its output in `log`."""

    name: str  # its slot: `alpha-0` keeps the name across replacements
    args: list[str]
    log: Path
    pool: str = ""  # a worker's pool
    node: str = ""  # a worker's node name, as it registers
    popen: subprocess.Popen[bytes] | None = None

    def start(self, append: bool = False) -> Child:
        """Start it; its log starts afresh unless `append` (a replacement in its slot, a
        coordinator started again: the chaos check reads every one's lines)."""
        with open(self.log, "ab" if append else "wb") as log:
            self.popen = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """`sig` to the whole process tree (a server engine's server too)."""
        if self.alive():
            os.killpg(self.pid, sig)

    def wait(self, timeout_s: float) -> int | None:
        """Its exit status, or None if it is still running after `timeout_s`."""
        assert self.popen is not None
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        self.signal(signal.SIGTERM)
        if self.popen is not None and self.wait(grace_s) is None:
            self.signal(signal.SIGKILL)
            self.popen.wait()

    def tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class LocalFleet:
    """A config's fleet on this machine. `up` ensures Redis, starts `workers_per_pool`
    workers per pool and waits until they registered; `start_worker`, `replace_worker`
    and `start_coordinator` add to it; `stop` (or leaving the ``with`` block) stops every
    child as a tree and a Redis started here."""

    def __init__(
        self,
        config_path: str | Path,
        run_dir: str | Path,
        *,
        cfg: RunConfig | None = None,
        workers_per_pool: int = 1,
        tag: str | None = None,
        worker_command: tuple[str, ...] = WORKER_COMMAND,
        local_redis: LocalRedis | SentinelGroup | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.cfg = cfg or load_config(self.config_path)
        self.run_dir = Path(run_dir)
        self.logs = self.run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.workers_per_pool = workers_per_pool
        self.tag = tag or os.uname().nodename  # a worker's node is `<slot>@<tag>`
        self.worker_command = worker_command
        # A Redis the caller passes is the caller's to stop; one made here is ours.
        self._own_redis = local_redis is None
        self.redis: LocalRedis | SentinelGroup = local_redis or LocalRedis(
            self.cfg.redis_url, self.run_dir / "redis"
        )
        self.client = connect(self.cfg.redis_url)
        self.keys = Keys(self.cfg.namespace)
        self.workers: list[Child] = []
        self.coordinators: list[Child] = []
        self._generation: dict[str, int] = {}  # slot -> workers started in it
        self._echo = echo or (lambda _msg: None)

    def __enter__(self) -> LocalFleet:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    # -- start ------------------------------------------------------------------------
    def up(self, timeout_s: float | None = None) -> float:
        """Redis (started if none answers), then the workers, ready: the seconds it took."""
        start = time.monotonic()
        if not self.redis.ensure():
            self._echo(
                f"no Redis answered at the config's URL; started one in {self.redis.data_dir}"
            )
        for pool in self.cfg.model_names:
            for _ in range(self.workers_per_pool):
                self.start_worker(pool)
        pools = ", ".join(self.cfg.model_names)
        self._echo(f"starting {len(self.workers)} workers ({pools}); logs in {self.logs}")
        self.wait_ready(timeout_s)
        return time.monotonic() - start

    def start_worker(self, pool: str, slot: str | None = None, node: str | None = None) -> Child:
        """A worker of `pool` in slot `slot` (default: the pool's next, `alpha-2`), its
        node `<slot>@<tag>` unless `node` names it."""
        slot = slot or f"{pool}-{sum(w.pool == pool for w in self.workers)}"
        child = self._spawn(pool, slot, node or f"{slot}@{self.tag}")
        self.workers.append(child)
        return child

    def _spawn(self, pool: str, slot: str, node: str) -> Child:
        args = [*self.worker_command, "--config", str(self.config_path)]
        args += ["--pool", pool, "--name", node]
        again = slot in self._generation
        self._generation.setdefault(slot, 1)
        return Child(slot, args, self.logs / f"{slot}.log", pool=pool, node=node).start(again)

    def replace_worker(self, index: int, sig: int = signal.SIGKILL) -> Child:
        """Stop worker `index` with `sig` (SIGKILL: a vanished spot machine; SIGTERM: a
        notice, its task finished or handed back), and start a new worker of its pool in
        its slot under a new node name, as a new machine comes up."""
        old = self.workers[index]
        old.signal(sig)
        old.wait(60)
        return self.respawn(index)

    def respawn(self, index: int) -> Child:
        """A new worker in the slot of worker `index` (which has exited), under a new node
        name (`alpha-0-g2@tag`)."""
        old = self.workers[index]
        generation = self._generation[old.name] + 1
        new = self._spawn(old.pool, old.name, f"{old.name}-g{generation}@{self.tag}")
        self._generation[old.name] = generation
        self.workers[index] = new
        return new

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Until every live worker has registered. A worker that exits first is a
        `FleetError` with the end of its log. The default wait: 300 s, or the longest
        server start-up a pool allows (`startup_timeout_s`)."""
        if timeout_s is None:
            starts = [
                getattr(self.cfg.pool(n), "startup_timeout_s", 0.0) for n in self.cfg.model_names
            ]
            timeout_s = max([300.0, *starts])
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [w for w in self.workers if not w.alive()]
            if dead:
                raise FleetError(f"worker {dead[0].node} exited while loading:\n{dead[0].tail()}")
            nodes = [w.node for w in self.workers]
            registered = self.client.hmget(self.keys.workers, nodes) if nodes else []
            if all(registered):
                return
            if time.monotonic() > deadline:
                waiting = [n for n, r in zip(nodes, registered, strict=True) if not r]
                raise FleetError(
                    f"workers {waiting} not ready after {timeout_s:.0f}s; logs in {self.logs}"
                )
            time.sleep(0.2)

    def start_coordinator(self, out: str | Path, *args: str) -> Child:
        """`cord-coord run` on the fleet's config, its rows in `out` (`--no-progress`)."""
        argv = [*COORDINATOR_COMMAND, "run", "--config", str(self.config_path)]
        argv += ["--out", str(out), "--no-progress", *args]
        child = Child("coordinator", argv, self.logs / "coordinator.log")
        child.start(append=bool(self.coordinators))  # one log for all of them
        self.coordinators.append(child)
        return child

    # -- stop -------------------------------------------------------------------------
    def stop(self, wipe: bool = False, grace_s: float = STOP_GRACE_S) -> None:
        """Every child, coordinators first, as process trees; with `wipe`, then the
        namespace (`wipe`); last, a Redis started here."""
        children = [*self.coordinators, *self.workers]
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in children:
            child.stop(max(0.1, deadline - time.monotonic()))
        self.workers, self.coordinators = [], []
        if wipe:
            self.wipe()
        if self._own_redis:
            self.redis.stop()

    def wipe(self, keep_workers: bool = False) -> None:
        """Delete the namespace's keys: problems, state, leases, queues (and, unless
        `keep_workers`, the worker registry, liveness keys and kombu's queue bindings:
        only once the workers are gone). Kept, the workers of this run stay registered:
        a task they ran before their next heartbeat would otherwise look lost."""
        wipe_namespace(self.client, self.keys, keep_workers)


def wipe_namespace(client: redis.Redis, keys: Keys, keep_workers: bool = False) -> int:
    """Delete `keys`' namespace (see `LocalFleet.wipe`); returns how many keys went."""
    keep = {keys.workers} if keep_workers else set()
    alive = keys.alive("")
    deleted = 0
    for pattern in keys.patterns(with_bindings=not keep_workers):
        found = [
            k
            for k in client.scan_iter(match=pattern, count=1000)
            if k.decode() not in keep and not (keep_workers and k.decode().startswith(alive))
        ]
        for i in range(0, len(found), 1000):
            deleted += int(client.delete(*found[i : i + 1000]))
    return deleted
