"""``cord-coord flower``: Flower, Celery's web monitor, on the run's broker, never open.

    FLOWER_BASIC_AUTH=admin:secret cord-coord flower --config examples/demo.yaml

Flower lists every pool's workers (they send task events, ``-E``), their tasks, and the
length of each queue they consume: it learns the queue names through remote-control
``inspect``, which needs neither gossip nor mingle, so the workers keep
``--without-gossip --without-mingle``. Flower inspects only once, when it starts, and a
fleet's workers come later (models load) and come and go (spot machines), so here it
inspects again every ``--inspect-every`` seconds. It runs on the same Celery app as the
fleet (`common/celery_app.py`), so it reads the broker exactly as the workers do.

Basic auth always: the credentials come from ``FLOWER_BASIC_AUTH`` (``user:password``,
comma-separated for several users). Without it, the ones in ``--auth-file`` are used,
and written there first (user ``cord``, a random password, mode 600) if the file does
not exist, so ``honcho start`` brings up a protected Flower with no setup. Any other
Flower option can be given after ``--`` or as ``FLOWER_<OPTION>``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any

from cord.common.celery_app import make_celery
from cord.common.config import RunConfig

AUTH_ENV = "FLOWER_BASIC_AUTH"
GENERATED_USER = "cord"
INSPECT_EVERY_S = 15.0


class FlowerError(ValueError):
    """Flower cannot start here; the message says why and the fix."""


class AuthError(FlowerError):
    """Credentials that Flower would not take; the message says which and the fix."""


def check_credentials(value: str) -> str:
    """``user:password[,user:password...]``, each part non-empty."""
    for pair in value.split(","):
        user, sep, password = pair.partition(":")
        if not (sep and user and password):
            raise AuthError(
                f"{AUTH_ENV} must be user:password (several separated by commas); "
                f"one entry is {'empty' if not pair else 'missing its user or password'}"
            )
    return value


def resolve_auth(auth_file: Path) -> tuple[str, str]:
    """The credentials Flower will require, and where they came from (the environment,
    the file, or the file just generated)."""
    if value := os.environ.get(AUTH_ENV):
        return check_credentials(value), "environment"
    if auth_file.exists():
        return check_credentials(auth_file.read_text(encoding="utf-8").strip()), str(auth_file)
    auth_file.parent.mkdir(parents=True, exist_ok=True)
    value = f"{GENERATED_USER}:{secrets.token_urlsafe(18)}"
    # Created private: the password never goes to a log, only to this file.
    fd = os.open(auth_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    return value, f"{auth_file} (generated)"


def _reinspecting_flower(every_s: float) -> Any:
    """Flower's application, inspecting the workers every `every_s` seconds."""
    from flower.app import Flower
    from tornado.ioloop import PeriodicCallback

    class ReinspectingFlower(Flower):
        def start(self) -> None:
            # The IOLoop Flower is about to run; the callback fires inside it.
            PeriodicCallback(self.update_workers, every_s * 1000).start()
            super().start()

        def stop(self) -> None:
            # Flower turned the workers' task events on (its enable_events option); with
            # it gone nothing reads them, and publishing them costs a tiny model's worker
            # a third of its time. Another Flower still running turns them on again
            # within seconds. Called at exit (SIGTERM too), best effort.
            with contextlib.suppress(Exception):
                self.capp.control.disable_events()
            super().stop()

    return ReinspectingFlower


def run_flower(
    cfg: RunConfig,
    port: int,
    address: str,
    auth_file: Path,
    extra: tuple[str, ...] = (),
    inspect_every_s: float = INSPECT_EVERY_S,
) -> int:
    """Run Flower in this process until it is stopped; returns its exit code."""
    try:
        import flower.command
    except ImportError as e:
        raise FlowerError(f"Flower is not installed ({e}): pip install -e '.[monitor]'") from e

    credentials, _ = resolve_auth(auth_file)
    # Flower reads FLOWER_* from the environment; kept out of argv so `ps` never shows it.
    os.environ[AUTH_ENV] = credentials
    # `celery flower` builds its application from this name; the subclass only adds the
    # periodic inspect, so every option and the command line stay Flower's own.
    flower.command.Flower = _reinspecting_flower(inspect_every_s)
    app = make_celery(cfg)
    code = app.start(["flower", f"--port={port}", f"--address={address}", *extra])
    return int(code or 0)
