"""Search strategies, peers in one registry so comparisons run through the same fleet."""

from __future__ import annotations

from cord.common.config import RunConfig
from cord.common.problems import Problem
from cord.coordinator.search.base import Failed, Search, Work
from cord.coordinator.search.cord import CordSearch

STRATEGIES: dict[str, type[Search]] = {"cord": CordSearch}


def make_search(problem: Problem, cfg: RunConfig) -> Search:
    return STRATEGIES[cfg.search.strategy](problem, cfg)


__all__ = ["STRATEGIES", "Failed", "Search", "Work", "make_search"]
