"""The fleet on inference servers: every pool on a vLLM server (vLLM's CPU build here,
one server per worker, launched and supervised by it). Part of `make bench`
(ops/bench/run_all.py runs each subcommand in a process of its own).

    python ops/bench/servers.py pairs --problems 48       # CoRD on vLLM against the in-worker
                                                          #   `hf` engine, then CoRD against
                                                          #   curation on vLLM
    python ops/bench/servers.py affinity                  # two servers per pool: prefix-cache
                                                          #   hits and wall time with and
                                                          #   without cache-affine routing

`pairs` first runs CoRD on 12 problems (`--compare-problems`) on the `hf` engine, then
on the vLLM servers, cold (one start-up of the servers serves the comparison and the
pairs): per engine the wall time, generated tokens per second (all models, kept and
discarded steps, answers), the prompt tokens the prefix caches served (the rows' own
count) and, for vLLM, the share from the servers' own counters
(`vllm:prefix_cache_hits_total` over `vllm:prefix_cache_queries_total`, as each worker's
heartbeat reports them); last `vllm_vs_hf_wall_ratio=`.

Then `fleet.py overhead`'s pairs method (`pairs.cord_curation_pairs`: alternating
order, new problems per pair, the median ratio with its spread and the ratio of totals)
with every pool on a vLLM server and every problem of a pair in flight at once (a
dataset keeps thousands in flight: the servers stay busy while any one problem waits for
its selection). Curation runs at the smallest N whose generated tokens reach CoRD's.
Beside `cord_vs_curation_wall_ratio_vllm`: the token ratio, and where the time goes
(`pairs.PairRuns.where_time_goes`): the share of wall time the servers had work, the
meta-prover's share of the servers' CPU, the share of a step that finished work waited
for its selection, and the tokens the models ran per problem (prefill not served from
the cache, by the servers' own counters, plus generated).

`affinity`: two workers (two servers) per pool, every pool's routing switched between
runs (`routing.affinity`, a coordinator setting: the same servers serve both), in pairs
on problems of their own, the order alternating. On lab problems, the share of prompt
tokens the servers' prefix caches served, by their own counters, with affinity on and
off (`vllm_prefix_cache_hit_affinity` / `_no_affinity`) and the wall ratio. Then the same
on problems whose prompt carries about 1,500 tokens of context of its own (a prefill in
the wrong place costs something there): `affinity_wall_ratio_long_prefix` is the median
of the pairs' wall time with affinity over without. Each server's KV cache holds about
30,000 tokens (`--kv-tokens`): room for the long problems that affinity sends it, not for
all of them, as a server of a large run has room for a fraction of the problems in
flight; with room for everything both servers soon cache every context and a wrong
place costs only the last steps (0.94 against 0.90 of prompt tokens from the cache, a
wall ratio of 0.93-0.96). The lab's models learned positions up to 1,024 only; these
runs use copies whose configs allow 4,096 (RoPE has no table to outgrow): what they
write past their training lengths is not meaningful, and these runs only time it.

Server start-up is timed apart and never counted. Rows go to temporary folders.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate
from harness import (
    SEED,
    WARMUP_SEED,
    BenchFleet,
    FleetRun,
    cache_share,
    default_redis_url,
    descendants,
    emit,
    exact_cpu_s,
    fleet_dict,
    lab_problems,
    machine,
    r3,
    redis_at,
    run_fleet,
    tokens_of,
)
from pairs import PairRuns, cord_curation_pairs

from cord.common import env
from cord.common.config import RoutingSpec, RunConfig, allow_bench_engine
from cord.common.log import configure
from cord.common.messages import EngineStats
from cord.coordinator.inputs.problems import Problem
from cord.lab.arith import make_problems

LONG_POSITIONS = 4096  # the long-prefix runs' model copies and servers


def server_share(stats: dict[str, EngineStats]) -> float | None:
    hits = sum(s.server_cache_hit_tokens or 0 for s in stats.values())
    queries = sum(s.server_cache_query_tokens or 0 for s in stats.values())
    return round(hits / queries, 4) if queries else None


def run_server_share(run: FleetRun) -> float | None:
    """The servers' own prefix-cache share over one run (their counters' deltas)."""
    return server_share(run.engine)


@click.group()
def main() -> None:
    """The fleet on vLLM servers (see the module docstring)."""
    configure(level="WARNING")
    allow_bench_engine()
    env.unset(env.NAMESPACE)


url_option = click.option(
    "--redis-url",
    default=default_redis_url,
    show_default="CORD_REDIS_URL or " + env.DEFAULT_REDIS_URL,
)
json_option = click.option("--json", "json_path", default=None, help="Also write figures here.")


def engine_figures(
    engine: str, fleet: BenchFleet, start_s: float, todo: list[Problem]
) -> dict[str, Any]:
    """CoRD on `todo` through `fleet`, every pool on `engine`: its figures in the
    comparison of the in-worker `hf` engine with vLLM."""
    servers = engine == "vllm"  # their own counters over the run, from later heartbeats
    run = run_fleet(fleet.cfg, todo, fleet=fleet if servers else None)
    tokens = tokens_of(run.rows) * len(run.rows)
    figures: dict[str, Any] = {
        f"{engine}_start_s": r3(start_s),
        f"{engine}_wall_s": r3(run.wall_s),
        f"{engine}_done": len(run.rows),
        f"{engine}_failed": run.failed,
        f"{engine}_tokens_per_s": r3(tokens / run.wall_s if run.wall_s else 0.0),
        f"{engine}_prefix_cache_hit": cache_share(run.rows),
    }
    if servers:
        figures["vllm_server_prefix_cache_hit"] = run_server_share(run)
    click.echo(
        f"{engine}: {len(run.rows)} done in {run.wall_s:.1f}s, "
        f"{figures[f'{engine}_tokens_per_s']} generated tok/s, "
        f"cache {figures[f'{engine}_prefix_cache_hit']}",
        err=True,
    )
    return figures


def hf_run(redis_url: str, tmp: Path, todo: list[Problem]) -> dict[str, Any]:
    """CoRD on `todo` with every pool on the in-worker `hf` engine."""
    fleet = BenchFleet(fleet_dict(redis_url, f"bench-{uuid.uuid4().hex[:8]}"), tmp)
    try:
        return engine_figures("hf", fleet, fleet.up(timeout_s=900), todo)
    finally:
        fleet.stop()


@main.command()
@url_option
@click.option("--problems", default=48, show_default=True, help="Problems per run.")
@click.option("--pairs", default=5, show_default=True)
@click.option(
    "--sim-pairs",
    default=3,
    show_default=True,
    help="Pairs of the sim engine calibrated on these servers (0: no check).",
)
@click.option(
    "--max-in-flight",
    default=None,
    type=int,
    help="Problems in flight at once (default: all of a run's).",
)
@click.option(
    "--compare-problems",
    default=12,
    show_default=True,
    help="First, CoRD on this many problems on the hf engine, then on the cold vLLM "
    "servers (0: a warm-up instead).",
)
@json_option
def pairs(
    redis_url: str,
    problems: int,
    pairs: int,
    sim_pairs: int,
    max_in_flight: int | None,
    compare_problems: int,
    json_path: str | None,
) -> None:
    """CoRD on the in-worker `hf` engine, then on vLLM servers, the same problems; CoRD
    against curation on those servers, in pairs; then the sim engine, calibrated on these
    servers and the run's lengths, predicts the pairs (calibrate.py)."""
    figures: dict[str, Any] = {"vllm_pairs_problems": problems}
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as tmp, redis_at(redis_url, Path(tmp)):
        todo = lab_problems(compare_problems, SEED + 7)
        hf = hf_run(redis_url, Path(tmp), todo) if compare_problems else {}
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        data = fleet_dict(redis_url, ns, engine="vllm", max_in_flight=max_in_flight or problems)
        fleet = BenchFleet(data, Path(tmp))
        try:
            start_s = fleet.up(timeout_s=900)
            figures["vllm_pairs_start_s"] = r3(start_s)
            if compare_problems:  # on cold servers, as a fleet's first problems meet them
                figures.update(engine_figures("vllm", fleet, start_s, todo), **hf)
                figures["servers_problems"] = compare_problems
                figures["vllm_vs_hf_wall_ratio"] = r3(figures["vllm_wall_s"] / hf["hf_wall_s"])
            else:
                run_fleet(fleet.cfg, lab_problems(4, WARMUP_SEED))  # compiles, connections
            first = run_fleet(fleet.cfg, lab_problems(problems, SEED + 100), fleet=fleet)
            result = cord_curation_pairs(fleet, first, problems, pairs, seed=SEED + 100)
            sim_data = calibrated_sim(fleet, data, result) if sim_pairs else None
        finally:
            fleet.stop()
        figures.update(result.figures("_vllm"))
        if sim_data is not None:
            sim_data["namespace"] = f"bench-{uuid.uuid4().hex[:8]}"
            sim = BenchFleet(sim_data, Path(tmp))
            try:
                sim.up()
                first = run_fleet(sim.cfg, lab_problems(problems, SEED + 100), fleet=sim)
                # The same experiment: curation at the real run's N.
                predicted = cord_curation_pairs(
                    sim, first, problems, sim_pairs, seed=SEED + 100, samples=result.samples
                )
            finally:
                sim.stop()
            figures.update(calibrate.prediction(result, predicted))
            figures["sim_costs"] = {
                t["name"]: t for t in [*sim_data["teachers"], sim_data["meta_prover"]]
            }
    figures["machine"] = machine()
    emit(figures, json_path)


def calibrated_sim(fleet: BenchFleet, data: dict[str, Any], result: PairRuns) -> dict[str, Any]:
    """`data`'s fleet on the sim engine, priced by its running servers' measured costs,
    with the lengths of `result`'s rows (calibrate.py)."""
    by_pool = {name.split("-")[0]: e for name, e in fleet.engine_stats().items()}
    pids = {w.name.split("-")[0]: w.pid for w in fleet.workers}
    costs, kv = {}, {}
    for spec in [*fleet.cfg.teachers, fleet.cfg.meta_prover]:
        stats = by_pool[spec.name]
        assert stats.server_url and stats.kv_capacity_tokens and spec.model
        config = json.loads((Path(spec.model) / "config.json").read_text(encoding="utf-8"))
        server = descendants(pids[spec.name])  # the worker's server, and what it runs
        costs[spec.name] = calibrate.measure(
            stats.server_url,
            lambda pids=server: exact_cpu_s(pids),
            int(config["vocab_size"]),
            together=spec.max_batch,
        )
        kv[spec.name] = stats.kv_capacity_tokens
        click.echo(f"{spec.name}: measured {costs[spec.name]}, KV {kv[spec.name]} tokens", err=True)
    cord = [row for run, _ in result.runs for row in run.rows]
    curation = [row for _, run in result.runs for row in run.rows]
    lengths = calibrate.lab_lengths(fleet.cfg, cord, curation)
    return calibrate.sim_dict(fleet.cfg, data, costs, lengths, kv)


# -- affinity on two servers per pool ---------------------------------------------------
def long_models(into: Path) -> dict[str, str]:
    """Copies of the lab's models whose configs allow `LONG_POSITIONS` positions."""
    data = fleet_dict(env.DEFAULT_REDIS_URL, "x")
    out = {}
    for entry in [*data["teachers"], data["meta_prover"]]:
        src = Path(entry["model"])
        dst = into / src.name
        shutil.copytree(src, dst)
        config = json.loads((dst / "config.json").read_text(encoding="utf-8"))
        config["max_position_embeddings"] = LONG_POSITIONS
        (dst / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        out[entry["name"]] = str(dst)
    return out


def kv_bytes_per_token(model: str) -> int:
    """Bytes of KV cache one token takes in `model` (float32, as the CPU servers run)."""
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return int(config["num_hidden_layers"]) * 2 * kv_heads * head_dim * 4


def long_problems(n: int, seed: int, context_tokens: int) -> list[Problem]:
    """Lab problems, each after a context of its own of about `context_tokens` tokens of
    the lab's tokenizers: other lab questions with their answers, as notes."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        fleet_dict(env.DEFAULT_REDIS_URL, "x")["teachers"][0]["model"]
    )
    out = []
    for i, p in enumerate(make_problems(n, seed)):
        lines = [
            f"{q.question} The answer is {q.answer}." for q in make_problems(200, seed * 1000 + i)
        ]
        sizes = [len(ids) for ids in tokenizer([x + "\n" for x in lines])["input_ids"]]
        notes: list[str] = []
        count = 0  # tokens of the notes so far (each line and its newline)
        while count < context_tokens:
            notes.append(lines[len(notes) % len(lines)])
            count += sizes[(len(notes) - 1) % len(lines)]
        question = "Notes:\n" + "\n".join(notes) + f"\n\n{p.question}"
        out.append(Problem(id=f"long-{seed}-{i}", question=question, answer=p.answer))
    return out


def with_affinity(cfg: RunConfig, on: bool) -> RunConfig:
    return cfg.model_copy(update={"routing": RoutingSpec(affinity=on)})


@dataclass
class AffinityPairs:
    """Runs with and without affinity, in pairs on problems of their own, the order
    alternating (a server's cache and compiled shapes favour nothing in particular)."""

    runs: list[tuple[FleetRun, FleetRun]]  # (affinity, without)

    def figures(self, share: str, ratio: str) -> dict[str, Any]:
        """The servers' cache share with and without (`share`_affinity, `share`_no_affinity,
        over all runs) and the wall ratio (`ratio`: the median of the pairs')."""
        out: dict[str, Any] = {}
        for i, tag in enumerate(("affinity", "no_affinity")):
            runs = [pair[i] for pair in self.runs]
            engines = {f"{i}:{name}": e for i, r in enumerate(runs) for name, e in r.engine.items()}
            out[f"{share}_{tag}"] = server_share(engines)
            out[f"{ratio}_{tag}_wall_s"] = ",".join(f"{r.wall_s:.2f}" for r in runs)
            out[f"{ratio}_{tag}_done"] = sum(len(r.rows) for r in runs)
        walls = [a.wall_s / b.wall_s for a, b in self.runs]
        out[f"{ratio}s"] = ",".join(f"{w:.3f}" for w in walls)
        out[ratio] = r3(statistics.median(walls))
        return out


def affinity_pairs(
    fleet: BenchFleet, on: RunConfig, off: RunConfig, sets: list[list[Problem]], label: str
) -> AffinityPairs:
    pairs = []
    for k in range(len(sets) // 2):
        order = [(0, on), (1, off)] if k % 2 == 0 else [(1, off), (0, on)]
        done: dict[int, FleetRun] = {}
        for slot, (i, cfg) in enumerate(order):
            done[i] = run_fleet(cfg, sets[2 * k + slot], fleet=fleet)
        pairs.append((done[0], done[1]))
        click.echo(
            f"{label}, pair {k + 1}: affinity {done[0].wall_s:.1f}s (cache "
            f"{run_server_share(done[0])}), without {done[1].wall_s:.1f}s (cache "
            f"{run_server_share(done[1])}): {done[0].wall_s / done[1].wall_s:.3f}",
            err=True,
        )
    return AffinityPairs(pairs)


@main.command()
@url_option
@click.option("--problems", default=24, show_default=True, help="Lab problems per run.")
@click.option("--lab-pairs", default=2, show_default=True)
@click.option(
    "--long-problems", "long_problems_n", default=16, show_default=True, help="Per long-prefix run."
)
@click.option("--long-pairs", default=3, show_default=True)
@click.option("--context-tokens", default=1500, show_default=True)
@click.option(
    "--kv-tokens",
    default=30_000,
    show_default=True,
    help="KV cache of each server, in tokens: room for its share of the long problems in "
    "flight (about 25,000 of 16), not for all of them (as on a server of a large run).",
)
@click.option("--workers-per-pool", default=2, show_default=True)
@json_option
def affinity(
    redis_url: str,
    problems: int,
    lab_pairs: int,
    long_problems_n: int,
    long_pairs: int,
    context_tokens: int,
    kv_tokens: int,
    workers_per_pool: int,
    json_path: str | None,
) -> None:
    """Prefix-cache hits and wall time with and without affinity, two servers per pool."""
    figures: dict[str, Any] = {
        "affinity_problems": problems,
        "affinity_long_problems": long_problems_n,
        "affinity_context_tokens": context_tokens,
        "affinity_kv_tokens": kv_tokens,
        "affinity_workers_per_pool": workers_per_pool,
    }
    long_sets = [  # the last one warms up
        long_problems(long_problems_n, SEED + 200 + k, context_tokens)
        for k in range(2 * long_pairs + 1)
    ]
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as tmp, redis_at(redis_url, Path(tmp)):
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        data = fleet_dict(redis_url, ns, engine="vllm", max_in_flight=max(problems, 32))
        models = long_models(Path(tmp))
        for entry in [*data["teachers"], data["meta_prover"]]:
            model = models[entry["name"]]
            gib = kv_tokens * kv_bytes_per_token(model) / 2**30
            entry.update(model=model, max_model_len=LONG_POSITIONS, cpu_kvcache_gib=gib)
        fleet = BenchFleet(data, Path(tmp), workers_per_pool)
        try:
            figures["affinity_start_s"] = r3(fleet.up(timeout_s=900))
            on, off = with_affinity(fleet.cfg, True), with_affinity(fleet.cfg, False)
            # Warm-up: the CPU build compiles for new batch shapes on first use.
            run_fleet(off, lab_problems(problems, WARMUP_SEED))
            run_fleet(off, long_sets[-1][:4])
            lab_sets = [lab_problems(problems, SEED + 300 + k) for k in range(2 * lab_pairs)]
            lab = affinity_pairs(fleet, on, off, lab_sets, "lab prompts")
            long = affinity_pairs(fleet, on, off, long_sets[:-1], "long prefix")
        finally:
            fleet.stop()
    figures.update(lab.figures("vllm_prefix_cache_hit", "affinity_wall_ratio_lab"))
    figures.update(long.figures("long_prefix_cache_hit", "affinity_wall_ratio_long_prefix"))
    figures["machine"] = machine()
    emit(figures, json_path)


if __name__ == "__main__":
    main()
