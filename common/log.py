"""structlog, configured once per process: JSON lines when stderr is not a TTY,
readable console lines when it is. Bind `problem_id`, `teacher`, `step`, `task_id`."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from cord.common import env

_configured = False
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # what --log-level takes


def configure(level: str | None = None, json: bool | None = None) -> None:
    global _configured
    level_name = (level or env.log_level() or "INFO").upper()
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str, **bind: Any) -> Any:
    if not _configured:
        configure()
    return structlog.get_logger(name).bind(**bind)
