"""Search strategies, peers in one registry so comparisons run through the same fleet:

- ``cord``: the paper's collaborative step-wise beam search (`cord.CordSearch`)
- ``greedy``: CoRD with a beam of one
- ``random``: CoRD with random instead of S-based selection (an ablation)
- ``curation``: N whole trajectories per teacher, the best by S kept
- ``single:<teacher>``: one teacher alone
"""

from __future__ import annotations

from cord.common.config import RunConfig
from cord.common.problems import Problem
from cord.coordinator.search.base import Failed, Search, Work
from cord.coordinator.search.cord import CordSearch, GreedySearch, RandomSelectSearch
from cord.coordinator.search.curation import CurationSearch

STRATEGIES: dict[str, type[Search]] = {
    "cord": CordSearch,
    "greedy": GreedySearch,
    "random": RandomSelectSearch,
    "curation": CurationSearch,
    "single": CurationSearch,
}


def make_search(problem: Problem, cfg: RunConfig) -> Search:
    return STRATEGIES[cfg.search.strategy.split(":", 1)[0]](problem, cfg)


__all__ = ["STRATEGIES", "Failed", "Search", "Work", "make_search"]
