"""CoRD against curation on one fleet, in pairs (`fleet.py overhead`, `servers.py pairs`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click
from harness import SEED, BenchFleet, FleetRun, lab_problems, r3, run_fleet, tokens_of

from cord.coordinator.evaluate import matched_curation_samples
from cord.coordinator.inputs.problems import Problem


@dataclass
class PairRuns:
    """CoRD and curation run back to back on the same fleet, pair after pair: each pair
    on problems of its own (workers keep their prefix caches between runs: CoRD again on
    the same problems would find its trajectories cached), the order alternating (the
    second run of a pair finds the questions cached). On a shared machine the same run's
    CPU time varies by 15% from one minute to the next, so one run of each is a coin toss:
    the figure is the median of the pairs' ratios, with their spread."""

    samples: int  # curation's N: the smallest whose generated tokens reach CoRD's
    runs: list[tuple[FleetRun, FleetRun]]  # (cord, curation)
    meta: str  # the meta-prover's pool (its workers are `<meta>-<slot>`)

    def where_time_goes(self, runs: list[FleetRun]) -> dict[str, float | None]:
        """Of a strategy's runs: the share of wall time a worker's engine (a server's
        worker: its server) had work, averaged over workers; the meta-prover's share of
        the workers' CPU time (servers included); the share of a phase that finished
        results waited for their step's selection (`StepTimer`); and the tokens the
        models ran per problem (prompt tokens not served from a prefix cache, by the
        servers' own counters where they have them, and generated tokens), each part, and
        the requests (items) the engines served per problem."""
        wall = sum(r.wall_s for r in runs)
        busy = [e.busy_wall_s for r in runs for e in r.engine.values()]
        workers = max(1, len(runs[0].engine)) if runs else 1
        cpu = sum(sum(r.worker_cpu_s.values()) for r in runs)
        meta = sum(
            v for r in runs for k, v in r.worker_cpu_s.items() if k.startswith(f"{self.meta}-")
        )
        prefill = generated = scoring = requests = 0.0
        for r in runs:
            for name, e in r.engine.items():
                requests += e.requests
                if e.server_cache_query_tokens:
                    computed = e.server_cache_query_tokens - (e.server_cache_hit_tokens or 0)
                else:
                    computed = e.tokens.prompt - e.tokens.cached
                prefill += computed
                generated += e.tokens.generated
                if name.startswith(f"{self.meta}-"):
                    scoring += computed
        tokens = prefill + generated
        problems = sum(len(r.rows) + r.failed for r in runs)
        waits = sum(r.wait_s for r in runs)
        phases = sum(r.phase_s for r in runs)
        return {
            "busy_share": r3(sum(busy) / (workers * wall)) if wall and busy else None,
            "scoring_cpu_share": r3(meta / cpu) if cpu else None,
            "selection_wait_share": r3(waits / phases) if phases else None,
            "model_tokens_per_problem": round(tokens / problems, 1) if problems else None,
            "prefill_tokens_per_problem": round(prefill / problems, 1) if problems else None,
            "scoring_prefill_tokens_per_problem": round(scoring / problems, 1)
            if problems
            else None,
            "decode_tokens_per_problem": round(generated / problems, 1) if problems else None,
            "requests_per_problem": round(requests / problems, 1) if problems else None,
        }

    def figures(self, tag: str = "") -> dict[str, Any]:
        """The pairs' figures; `tag` (e.g. ``_vllm``) follows ``cord_vs_curation_wall_ratio``
        and the ``curation_``/``pairs_`` names, so two fleets' pairs sit side by side."""
        paired, first = self.runs, self.runs[0][1]
        walls = [c.wall_s / k.wall_s for c, k in paired]
        cpus = [c.cpu_s / k.cpu_s for c, k in paired if k.cpu_s]
        ratio = f"cord_vs_curation_wall_ratio{tag}"
        split = {
            strategy: self.where_time_goes([pair[i] for pair in paired])
            for i, strategy in enumerate(("cord", "curation"))
        }
        tokens = {k: v["model_tokens_per_problem"] for k, v in split.items()}
        return {
            **{f"{k}_{name}{tag}": v for k, s in split.items() for name, v in s.items()},
            f"cord_vs_curation_model_token_ratio{tag}": r3(tokens["cord"] / tokens["curation"])
            if tokens["cord"] and tokens["curation"]
            else None,
            f"curation_samples{tag}": self.samples,
            f"curation_wall_s{tag}": r3(first.wall_s),
            f"curation_tokens_per_problem{tag}": round(tokens_of(first.rows), 1),
            f"curation_done{tag}": len(first.rows),
            f"curation_cpu_s{tag}": round(first.cpu_s, 2),
            f"pairs{tag}": len(paired),
            f"pairs_cord_wall_s{tag}": ",".join(f"{c.wall_s:.2f}" for c, _ in paired),
            f"pairs_curation_wall_s{tag}": ",".join(f"{k.wall_s:.2f}" for _, k in paired),
            f"pairs_cord_done{tag}": sum(len(c.rows) for c, _ in paired),
            f"pairs_curation_done{tag}": sum(len(k.rows) for _, k in paired),
            f"pairs_failed{tag}": sum(c.failed + k.failed for c, k in paired),
            f"{ratio}_min": r3(min(walls)),
            f"{ratio}_max": r3(max(walls)),
            ratio: r3(statistics.median(walls)),
            f"{ratio}_total": r3(
                sum(c.wall_s for c, _ in paired) / sum(k.wall_s for _, k in paired)
            ),
            f"cord_vs_curation_cpu_ratio{tag}": r3(statistics.median(cpus)) if cpus else None,
            f"cord_vs_curation_token_ratio{tag}": r3(
                sum(tokens_of(c.rows) for c, _ in paired)
                / sum(tokens_of(k.rows) for _, k in paired)
            )
            if first.rows
            else None,
        }


def cord_curation_pairs(
    fleet: BenchFleet,
    first: FleetRun,
    problems: int,
    pairs: int,
    seed: int = SEED,
    make: Callable[[int, int], list[Problem]] = lab_problems,
    samples: int | None = None,
) -> PairRuns:
    """`pairs` CoRD/curation pairs through `fleet`; `first` is CoRD's run on
    ``make(problems, seed)``, which sets curation's N (unless `samples` does) and opens
    the first pair. Pair k runs on ``make(problems, seed + k)``."""
    cfg = fleet.cfg
    n = samples or matched_curation_samples(cfg, first.rows)
    search = cfg.search.model_copy(update={"strategy": "curation", "curation_samples": n})
    cur_cfg = cfg.model_copy(update={"search": search})
    paired: list[tuple[FleetRun, FleetRun]] = []
    for pair in range(pairs):
        mine = make(problems, seed + pair)
        if pair == 0:  # CoRD ran first on these already
            c, k = first, run_fleet(cur_cfg, mine, fleet=fleet)
        elif pair % 2:
            k = run_fleet(cur_cfg, mine, fleet=fleet)
            c = run_fleet(cfg, mine, fleet=fleet)
        else:
            c = run_fleet(cfg, mine, fleet=fleet)
            k = run_fleet(cur_cfg, mine, fleet=fleet)
        paired.append((c, k))
        click.echo(
            f"pair {pair + 1}: cord {c.wall_s:.1f}s, curation N={n} {k.wall_s:.1f}s "
            f"({c.wall_s / k.wall_s:.3f}); cord {c.cpu_line()}; curation {k.cpu_line()}",
            err=True,
        )
    return PairRuns(n, paired, cfg.meta_prover.name)
