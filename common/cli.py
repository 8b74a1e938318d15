"""What both command lines share: an ordinary mistake ends in one line that names it and
its fix, not in a traceback (``CORD_DEBUG=1`` shows the traceback too)."""

from __future__ import annotations

from typing import Any

import click

from cord.common import env


def is_redis_unreachable(error: BaseException) -> bool:
    """A Redis connection that failed or timed out, as redis-py or Celery's Kombu say it."""
    import redis
    from kombu.exceptions import OperationalError

    return isinstance(error, redis.ConnectionError | redis.TimeoutError | OperationalError)


def redis_unreachable(error: BaseException) -> str:
    return (
        f"cannot reach Redis ({error}). Start one with `cord-coord redis-up`, or point "
        f"{env.REDIS_URL} (or the config's redis_url) at yours."
    )


class _OneLine:
    """A click command whose known failures end in one line (exit 1)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except Exception as e:
            if env.debug() or not is_redis_unreachable(e):
                raise
            raise click.ClickException(redis_unreachable(e)) from e


class OneLineGroup(_OneLine, click.Group):
    pass


class OneLineCommand(_OneLine, click.Command):
    pass
