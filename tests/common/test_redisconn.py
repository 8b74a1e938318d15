"""One Redis URL for every connection: the Sentinel form parsed, refused with the form
to use, turned into Kombu's broker URL, and redacted for logs."""

import pytest

from cord.common.redisconn import (
    RedisUrlError,
    SentinelTarget,
    celery_broker,
    check_url,
    parse_sentinel,
    redact_url,
)


def test_a_sentinel_url_names_sentinels_primary_database_and_passwords():
    url = "redis+sentinel://:s3cret@10.0.0.1:26380,10.0.0.2,db-3:7000/prod/2?sentinel_password=sp"
    assert parse_sentinel(url) == SentinelTarget(
        sentinels=(("10.0.0.1", 26380), ("10.0.0.2", 26379), ("db-3", 7000)),
        master="prod",
        db=2,
        password="s3cret",
        sentinel_password="sp",
    )


def test_plain_urls_are_not_sentinel_ones():
    for url in ("redis://127.0.0.1:6379/0", "rediss://:pw@cache.example:6380/1", "unix:///r.s"):
        assert parse_sentinel(url) is None
        assert check_url(url) == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:6379", "the scheme must be"),
        ("redis+sentinel://h1:26379", "name of the monitored primary"),
        ("redis+sentinel://h1:26379/m/x", "database must be a number"),
        ("redis+sentinel://h1:port/m", "'port' is not a number"),
        ("redis+sentinel://h1,,h2/m", "a Sentinel host is empty"),
        ("redis+sentinel://h1/m?timeout=3", "unknown option"),
    ],
)
def test_a_bad_url_is_refused_with_the_form_to_use(url, says):
    with pytest.raises(RedisUrlError, match=says):
        check_url(url)


def test_celery_gets_kombus_sentinel_transport_with_the_master_name():
    broker, options = celery_broker(
        "redis+sentinel://:pw@h1:26379,h2:26380/cord/3?sentinel_password=sp"
    )
    assert broker == "sentinel://:pw@h1:26379/3;sentinel://:pw@h2:26380/3"
    assert options == {"master_name": "cord", "sentinel_kwargs": {"password": "sp"}}
    assert celery_broker("redis://127.0.0.1:6379/0") == ("redis://127.0.0.1:6379/0", {})


def test_redacted_urls_show_no_password():
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://user:pw@h:6379/0") == "redis://user:***@h:6379/0"
    shown = redact_url("redis+sentinel://:pw@h1,h2:1/m/0?sentinel_password=sp")
    assert shown == "redis+sentinel://:***@h1,h2:1/m/0?sentinel_password=***"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_the_celery_app_on_a_sentinel_url_keeps_its_own_transport_options(tmp_path):
    import yaml

    from cord.common.celery_app import make_celery
    from cord.common.config import config_from_dict
    from tests.conftest import base_config

    data = base_config("redis+sentinel://:pw@h1:26379,h2:26380/cord/1", "ns")
    app = make_celery(config_from_dict(yaml.safe_load(yaml.safe_dump(data))))
    assert app.conf.broker_url == "sentinel://:pw@h1:26379/1;sentinel://:pw@h2:26380/1"
    options = app.conf.broker_transport_options
    assert options["master_name"] == "cord" and options["visibility_timeout"] > 0
