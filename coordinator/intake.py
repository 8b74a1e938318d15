"""Enqueueing a problems file: check every line first, enqueue nothing on any error
unless asked to skip bad lines (then they go, with reasons, to a rejects file)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import redis

from cord.common.config import RunConfig
from cord.common.keys import Keys
from cord.common.problems import LineError, read_problems
from cord.coordinator.store import Store


@dataclass
class EnqueueReport:
    valid: int = 0
    added: int = 0
    errors: list[LineError] = field(default_factory=list)
    rejects_path: Path | None = None

    @property
    def known(self) -> int:
        return self.valid - self.added


def enqueue_file(
    cfg: RunConfig, path: str | Path, skip_invalid: bool = False, rejects: str | Path | None = None
) -> EnqueueReport:
    problems, errors = read_problems(path)
    report = EnqueueReport(valid=len(problems), errors=errors)
    if errors:
        if not skip_invalid:
            return report
        report.rejects_path = Path(rejects or f"{path}.rejected.jsonl")
        lines = Path(path).read_bytes().split(b"\n")
        with open(report.rejects_path, "w", encoding="utf-8") as f:
            for err in errors:
                raw = lines[err.line - 1].decode("utf-8", "replace") if err.line else ""
                f.write(json.dumps({**err.to_json(), "raw": raw}, ensure_ascii=False) + "\n")
    client = redis.Redis.from_url(cfg.redis_url)
    try:
        report.added = Store(client, Keys(cfg.namespace)).enqueue(problems)
    finally:
        client.close()
    return report
