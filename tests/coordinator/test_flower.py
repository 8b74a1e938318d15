"""`cord-coord flower`'s credentials: from the environment, else a private file that is
generated once and reused; malformed ones are refused with the fix. And a stopped
Flower turns the workers' task events off (this module runs before tests/
test_monitoring.py, whose Flower would turn them on again)."""

from __future__ import annotations

import stat
import time

import pytest

from cord.common.celery_app import make_celery
from cord.coordinator.flower import AUTH_ENV, AuthError, resolve_auth
from tests.test_monitoring import fleet_workers, running_flower


def test_environment_credentials_win(monkeypatch, tmp_path):
    monkeypatch.setenv(AUTH_ENV, "ops:s3cret,ro:other")
    assert resolve_auth(tmp_path / "auth") == ("ops:s3cret,ro:other", "environment")
    assert not (tmp_path / "auth").exists()


def test_generated_once_private_and_reused(monkeypatch, tmp_path):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    path = tmp_path / "run" / "flower-auth"
    value, source = resolve_auth(path)
    user, _, password = value.partition(":")
    assert user == "cord" and len(password) >= 20 and "generated" in source
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert resolve_auth(path) == (value, str(path))


@pytest.mark.parametrize("bad", ["nopassword", "user:", ":pw", "a:b,"])
def test_malformed_credentials_are_refused(monkeypatch, tmp_path, bad):
    monkeypatch.setenv(AUTH_ENV, bad)
    with pytest.raises(AuthError, match="user:password"):
        resolve_auth(tmp_path / "auth")


@pytest.mark.redis
@pytest.mark.slow
def test_stopping_flower_turns_the_workers_task_events_off(fleet, tmp_path):
    """Flower turns task events on in every worker; they cost a worker much of its time
    on small models and nothing else reads them, so a stopped Flower turns them off."""
    config, cfg = fleet
    app = make_celery(cfg)

    def events_were_on() -> dict[str, bool]:
        """Turn task events off in every fleet worker; which had them on."""
        replies = app.control.broadcast("disable_events", reply=True, timeout=3)
        out = {}
        for reply in replies:
            for name, answer in reply.items():
                out[name] = answer.get("ok") == "task events disabled"
        return {k: v for k, v in out.items() if k in fleet_workers()}

    with running_flower(config, tmp_path / "flower.log") as (_, proc):
        deadline = time.monotonic() + 30
        on: dict[str, bool] = {}
        while not (len(on) == len(fleet_workers()) and all(on.values())):
            assert time.monotonic() < deadline, f"Flower never turned events on: {on}"
            time.sleep(1)
            on = events_were_on()  # Flower turns them on again every few seconds
        # On again, as Flower keeps them, for the moment it stops.
        app.control.broadcast("enable_events", reply=True, timeout=3)
    assert proc.returncode is not None
    assert events_were_on() == dict.fromkeys(fleet_workers(), False)
