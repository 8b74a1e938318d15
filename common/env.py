"""Every environment variable cord reads, named and read here only.

- ``CORD_REDIS_URL``: the Redis URL of every process, over the config's ``redis_url``
  (passwords belong here, not in a config file).
- ``CORD_NAMESPACE``: over the config's ``namespace``.
- ``CORD_LOG_LEVEL``: DEBUG, INFO (the default), WARNING, ... when no ``--log-level`` is
  given.
- ``CORD_WORKER_<OPTION>``: any option of ``cord-worker`` (``CORD_WORKER_DEVICE=cuda:1``);
  click reads them by this prefix.
- ``CORD_SPOT_METADATA_URL``: ``cord-spot-watch``'s metadata service (tests point it at a
  local one).
- ``CORD_DEBUG=1``: a command that fails on an ordinary mistake (Redis unreachable, a model
  that is not there) shows its traceback, not only the one line that names the fix
  (``cord-coord --debug`` sets it).
- ``CORD_REQUIRE_VLLM=1``: the test suite fails, instead of skipping, the vLLM tests when
  vLLM is not installed (CI sets it).
"""

from __future__ import annotations

import os

REDIS_URL = "CORD_REDIS_URL"
NAMESPACE = "CORD_NAMESPACE"
LOG_LEVEL = "CORD_LOG_LEVEL"
WORKER_PREFIX = "CORD_WORKER"
SPOT_METADATA_URL = "CORD_SPOT_METADATA_URL"
REQUIRE_VLLM = "CORD_REQUIRE_VLLM"
DEBUG = "CORD_DEBUG"

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url() -> str | None:
    """``CORD_REDIS_URL`` when set (and not empty)."""
    return os.environ.get(REDIS_URL) or None


def namespace() -> str | None:
    return os.environ.get(NAMESPACE) or None


def log_level() -> str | None:
    return os.environ.get(LOG_LEVEL) or None


def debug() -> bool:
    return os.environ.get(DEBUG, "") not in ("", "0")


def set_debug() -> None:
    os.environ[DEBUG] = "1"


def require_vllm() -> bool:
    return os.environ.get(REQUIRE_VLLM) == "1"


def run_scoped() -> dict[str, str]:
    """A copy of this process's environment without the variables that would override a
    run config's Redis URL and namespace: for a process that must take both from the
    config it is given (a benchmark's enqueue)."""
    env = dict(os.environ)
    env.pop(REDIS_URL, None)
    env.pop(NAMESPACE, None)
    return env


def unset(*names: str) -> None:
    """Take variables out of this process's environment (and so its children's): a
    harness that names each run's Redis and namespace in its configs."""
    for name in names:
        os.environ.pop(name, None)
