"""Search strategies, peers in one registry (`STRATEGIES`) so comparisons run through
the same fleet. The registry is the one list of strategies: config validation, the CLI
and `eval` read it.

- ``cord``: the paper's collaborative step-wise beam search (`cord.CordSearch`)
- ``greedy``: CoRD with a beam of one
- ``random``: CoRD keeping candidates in random order instead of by S (an ablation)
- ``longest``: CoRD keeping the longest steps (the paper's length ablation)
- ``mcts``: Monte-Carlo tree search over steps, UCB on S (`mcts.MctsSearch`)
- ``curation``: N whole trajectories per teacher, the best by S kept
- ``single:<teacher>``: one teacher alone

A new selection rule is one function (`cord.Rule`) and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cord.common.config import ConfigError, RunConfig
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.search.base import Outcome, Search, Work, WorkKey
from cord.coordinator.search.cord import CordSearch, by_score, longest, random_order
from cord.coordinator.search.curation import CurationSearch
from cord.coordinator.search.mcts import MctsSearch


@dataclass(frozen=True)
class Strategy:
    name: str
    make: Callable[[Problem, RunConfig, str], Search]  # (problem, config, argument)
    help: str
    argument: str | None = None  # what follows `name:` (single:<teacher>), if anything
    # `eval` runs CoRD first and gives this strategy a budget matched to CoRD's tokens
    matched_to_cord: bool = False


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "cord",
            lambda p, c, _: CordSearch(p, c, by_score),
            "collaborative step-wise beam search (the paper's method)",
        ),
        Strategy(
            "greedy",
            lambda p, c, _: CordSearch(p, c, by_score, beam_width=1),
            "CoRD with a beam of one",
        ),
        Strategy(
            "random",
            lambda p, c, _: CordSearch(p, c, random_order),
            "CoRD keeping random candidates instead of the best by S",
        ),
        Strategy(
            "longest",
            lambda p, c, _: CordSearch(p, c, longest),
            "CoRD keeping the longest steps",
        ),
        Strategy(
            "mcts",
            lambda p, c, _: MctsSearch(p, c),
            "tree search over steps, UCB on S, tokens matched to CoRD's",
            matched_to_cord=True,
        ),
        Strategy(
            "curation",
            lambda p, c, _: CurationSearch(p, c),
            "N whole trajectories per teacher, the best by S (N matched to CoRD's tokens)",
            matched_to_cord=True,
        ),
        Strategy(
            "single",
            lambda p, c, teacher: CurationSearch(p, c, teachers=[teacher], samples=1),
            "one trajectory by one teacher",
            argument="teacher",
        ),
    )
}


def strategy_names() -> list[str]:
    """As a user writes them: ``cord``, ..., ``single:<teacher>``."""
    return [f"{s.name}:<{s.argument}>" if s.argument else s.name for s in STRATEGIES.values()]


def lookup(name: str) -> tuple[Strategy, str] | None:
    """The strategy `name` selects and its argument (``single:alpha`` -> single,
    ``alpha``); None when there is none or its argument is missing or extra."""
    head, sep, arg = name.partition(":")
    strategy = STRATEGIES.get(head)
    if strategy is None or bool(strategy.argument) != bool(sep and arg):
        return None
    return strategy, arg


def strategy_of(cfg: RunConfig, source: str = "config") -> tuple[Strategy, str]:
    """The strategy `cfg` runs and its argument. A name the registry does not know, or a
    ``single:`` that names no teacher, is a `ConfigError` naming `source`: the check of
    ``search.strategy`` is the coordinator's (the workers never read it), made where it
    loads a config (`cord-coord`, `Coordinator`, `eval`)."""
    name = cfg.search.strategy
    found = lookup(name)
    if found is None:
        problem = f"unknown strategy {name!r}; use one of {', '.join(strategy_names())}"
    elif found[0].argument == "teacher" and found[1] not in cfg.teacher_names:
        problem = f"{name!r} names no teacher; use one of {cfg.teacher_names}"
    else:
        return found
    raise ConfigError(f"{source}: invalid run config:\n  search.strategy: {problem}")


def make_search(problem: Problem, cfg: RunConfig) -> Search:
    strategy, arg = strategy_of(cfg)
    return strategy.make(problem, cfg, arg)


__all__ = [
    "STRATEGIES",
    "Outcome",
    "Search",
    "Strategy",
    "Work",
    "WorkKey",
    "lookup",
    "make_search",
    "strategy_names",
    "strategy_of",
]
