"""`cord-coord flower`'s credentials: from the environment, else a private file that is
generated once and reused; malformed ones are refused with the fix."""

from __future__ import annotations

import stat

import pytest

from cord.coordinator.flower import AUTH_ENV, AuthError, resolve_auth


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
