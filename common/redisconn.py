"""Every Redis connection of cord, from one URL: a plain server or a primary behind
Redis Sentinel.

Two forms are taken wherever a Redis URL goes (the config's ``redis_url``,
``CORD_REDIS_URL``, ``--url``):

- ``redis://[[user]:password@]host[:port][/db]`` (and ``rediss://``, ``unix://``): one
  server, as redis-py reads it;
- ``redis+sentinel://[[user]:password@]host1[:port1][,host2[:port2]...]/MASTER[/db]``:
  the Sentinels to ask (port 26379 unless given) and the name they monitor the primary
  under; the password is the primary's. Sentinels that themselves require a password
  take it as ``?sentinel_password=...``.

A Sentinel client asks the Sentinels for the primary on every new connection, so after
a failover the next connection goes to the promoted replica; a connection to the old
primary, now a replica, fails on its first write (redis-py's ``SentinelManagedConnection``
turns READONLY into a connection error) and is made again. Celery takes the same URL
through Kombu's ``sentinel://`` transport with ``master_name`` (`celery_broker`).
A managed Redis whose failover moves one endpoint (ElastiCache, Memorystore, Azure Cache)
is a plain ``redis://`` or ``rediss://`` URL: its connections drop and are made again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
PLAIN_SCHEMES = ("redis", "rediss", "unix")
EXAMPLE = "redis+sentinel://:PASSWORD@host1:26379,host2:26379,host3:26379/MASTER/0"
# The group `cord-coord redis-up --replica` starts when given no URL: three local
# Sentinels watching the primary "cord".
DEFAULT_SENTINEL_URL = "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380,127.0.0.1:26381/cord/0"


class RedisUrlError(ValueError):
    """A Redis URL cord cannot use; the message says what is wrong and the form to use."""


@dataclass(frozen=True)
class SentinelTarget:
    """A ``redis+sentinel://`` URL, parsed."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    def client_kwargs(self) -> dict[str, Any]:
        """What every connection to the primary needs beside its address."""
        out: dict[str, Any] = {"db": self.db}
        if self.username:
            out["username"] = self.username
        if self.password:
            out["password"] = self.password
        return out


def parse_sentinel(url: str) -> SentinelTarget | None:
    """The Sentinel target of `url`, or None for a plain Redis URL; `RedisUrlError` when
    the URL is neither."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in (SENTINEL_SCHEME, *PLAIN_SCHEMES):
        raise RedisUrlError(
            f"Redis URL {redact_url(url)!r}: the scheme must be redis://, rediss://, unix:// or "
            f"{SENTINEL_SCHEME}:// (e.g. redis://127.0.0.1:6379/0, or {EXAMPLE})"
        )
    if scheme != SENTINEL_SCHEME:
        return None
    rest, _, query = rest.partition("?")
    userinfo, at, hosts_path = rest.rpartition("@")
    if not at:
        hosts_path = rest
    hosts, _, path = hosts_path.partition("/")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise RedisUrlError(
            f"Redis URL {redact_url(url)!r}: after the Sentinels comes the name of the "
            f"monitored primary and, optionally, the database: {EXAMPLE}"
        )
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise RedisUrlError(
            f"Redis URL {redact_url(url)!r}: the database must be a number, as in {EXAMPLE}"
        ) from None
    sentinels: list[tuple[str, int]] = []
    for hostport in hosts.split(","):
        host, colon, port = hostport.strip().rpartition(":")
        if not colon:
            host, port = hostport.strip(), ""
        if not host:
            raise RedisUrlError(
                f"Redis URL {redact_url(url)!r}: a Sentinel host is empty; list them as "
                f"host:port separated by commas: {EXAMPLE}"
            )
        try:
            sentinels.append((host, int(port) if port else SENTINEL_PORT))
        except ValueError:
            raise RedisUrlError(
                f"Redis URL {redact_url(url)!r}: Sentinel port {port!r} is not a number"
            ) from None
    username, _, password = userinfo.partition(":") if at else ("", "", "")
    options = parse_qs(query)
    unknown = sorted(set(options) - {"sentinel_password"})
    if unknown:
        raise RedisUrlError(
            f"Redis URL {redact_url(url)!r}: unknown option(s) {unknown}; only sentinel_password"
        )
    return SentinelTarget(
        sentinels=tuple(sentinels),
        master=unquote(parts[0]),
        db=db,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=options.get("sentinel_password", [None])[0],
    )


def check_url(url: str) -> str:
    """`url` when cord can use it; `RedisUrlError` naming the fix otherwise."""
    parse_sentinel(url)
    return url


def sentinel_of(target: SentinelTarget, **kwargs: Any) -> Sentinel:
    sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    return Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs, **kwargs)


def connect(url: str, **kwargs: Any) -> redis.Redis:
    """A client for `url` (either form); `kwargs` go to every connection (timeouts,
    ``health_check_interval``)."""
    target = parse_sentinel(url)
    if target is None:
        return redis.Redis.from_url(url, **kwargs)
    client: redis.Redis = sentinel_of(target, **kwargs).master_for(
        target.master, **target.client_kwargs(), **kwargs
    )
    return client


def primary_address(client: redis.Redis) -> str:
    """``host:port`` of the server `client` talks to now (for a Sentinel client, the
    primary the Sentinels name); may raise a connection error."""
    pool = client.connection_pool
    if hasattr(pool, "get_master_address"):
        host, port = pool.get_master_address()
        return f"{host}:{port}"
    kw = pool.connection_kwargs
    return str(kw.get("path") or f"{kw.get('host')}:{kw.get('port')}")


def replicas_of(client: redis.Redis) -> int:
    """How many replicas are connected to the server `client` writes to."""
    info = client.info("replication")
    return int(info.get("connected_slaves", 0))


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL for `url` and the transport options it needs: a Sentinel URL
    becomes Kombu's ``sentinel://h1:p1;sentinel://h2:p2/db`` with ``master_name`` (and
    ``sentinel_kwargs`` for a Sentinel password)."""
    target = parse_sentinel(url)
    if target is None:
        return url, {}
    auth = ""
    if target.password:
        auth = f"{target.username or ''}:{target.password}@"
    broker = ";".join(f"sentinel://{auth}{h}:{p}/{target.db}" for h, p in target.sentinels)
    options: dict[str, Any] = {"master_name": target.master}
    if target.sentinel_password:
        options["sentinel_kwargs"] = {"password": target.sentinel_password}
    return broker, options


def redact_url(url: str) -> str:
    """`url` fit for logs: its passwords replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, q, query = rest.partition("?")
    userinfo, at, hosts = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:***@{hosts}"
    if q:
        query = "&".join(
            f"{k}=***" if k.endswith("password") else f"{k}={v}"
            for k, _, v in (p.partition("=") for p in query.split("&"))
        )
        rest = f"{rest}?{query}"
    return f"{scheme}://{rest}"
