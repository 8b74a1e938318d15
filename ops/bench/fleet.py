"""Fleet benchmarks: what the coordinator, Redis and the workers cost beyond the models.

    python ops/bench/fleet.py dispatch --problems 2000   # bench engine: items/s, step latency
    python ops/bench/fleet.py memory --problems 10000    # bench engine: coordinator RSS
    python ops/bench/fleet.py soak --waves 8             # bench engine: --follow, workers stop
    python ops/bench/fleet.py overhead --problems 24     # lab models: fleet vs one process,
                                                         #   and CoRD vs curation
    python ops/bench/fleet.py cache --problems 16        # lab models: prefix-cache hits
                                                         #   with and without affinity
    python ops/bench/fleet.py overhead --device cuda --model /path/to/model   # a GPU box

Each subcommand starts what it needs: a Redis if none answers at ``--redis-url`` (or
CORD_REDIS_URL), real ``cord-worker`` processes (through the ``worker`` subcommand, the
only way a worker may load the `bench` engine: `harness.BenchFleet`), and runs the
coordinator in this process. It prints its figures, then ``name=value`` lines;
``--json PATH`` also writes them as JSON (`run_all.py`, ``make bench``, collects them).

Problems come from the lab (`cord-lab problems`), settings from ``examples/demo.yaml``
(three teachers, B = 4, T = 0.6, the same budgets).
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    SEED,
    WARMUP_SEED,
    BenchFleet,
    RedisSampler,
    cache_share,
    default_redis_url,
    emit,
    fleet_dict,
    gpu_name,
    lab_problems,
    machine,
    percentile,
    r3,
    redis_at,
    rss_mib,
    run_fleet,
    synthetic_problems,
)
from pairs import cord_curation_pairs

from cord.common import env
from cord.common.config import allow_bench_engine, config_from_dict
from cord.common.keys import Keys
from cord.common.log import configure
from cord.coordinator.driver import Coordinator
from cord.coordinator.store import Store

# -- commands -------------------------------------------------------------------------------
url_option = click.option(
    "--redis-url",
    default=default_redis_url,
    show_default="CORD_REDIS_URL or " + env.DEFAULT_REDIS_URL,
    help="Redis to use; started here (on that port) when none answers.",
)
json_option = click.option("--json", "json_path", default=None, help="Also write figures here.")


@click.group()
@click.option(
    "--log-level",
    default="WARNING",
    show_default=True,
    help="Of the coordinator run here (workers log at INFO to their files, as deployed).",
)
def main(log_level: str) -> None:
    """Fleet benchmarks (see the module docstring)."""
    configure(level=log_level)
    allow_bench_engine()  # this harness only; its bench rows never leave a temp folder
    env.unset(env.NAMESPACE)  # each run picks its own namespace


@main.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def worker(args: tuple[str, ...]) -> None:
    """`cord-worker ARGS`, with the bench engine allowed (the fleet starts these)."""
    from cord.workers.cli import main as worker_main

    worker_main.main(args=list(args), prog_name="cord-worker")


@main.command()
@url_option
@click.option("--problems", default=2000, show_default=True)
@click.option("--max-in-flight", default=1000, show_default=True)
@click.option("--workers-per-pool", default=1, show_default=True)
@click.option("--steps", default=4, show_default=True, help="Steps per trajectory.")
@json_option
def dispatch(
    redis_url: str,
    problems: int,
    max_in_flight: int,
    workers_per_pool: int,
    steps: int,
    json_path: str | None,
) -> None:
    """Expansion items per second through the whole fleet on the bench engine, and the
    step latency (dispatch of a step's expansions to its selection and commit)."""
    info = machine()
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as tmp, redis_at(redis_url, Path(tmp)):
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        data = fleet_dict(
            redis_url, ns, engine="bench", bench_steps=steps, max_in_flight=max_in_flight
        )
        fleet = BenchFleet(data, Path(tmp), workers_per_pool)
        try:
            fleet.up()
            run_fleet(fleet.cfg, synthetic_problems(50, "warm"))  # connections, imports
            run = run_fleet(fleet.cfg, synthetic_problems(problems, "p"), fleet=fleet)
        finally:
            fleet.stop()
    kinds = run.summary.get("by_kind", {})
    expand = kinds.get("expand", 0)
    items = sum(kinds.values())
    figures = {
        "dispatch_problems": problems,
        "dispatch_done": len(run.rows),
        "dispatch_failed": run.failed,
        "dispatch_workers": workers_per_pool * len(fleet.cfg.model_names),
        "dispatch_max_in_flight": max_in_flight,
        "dispatch_wall_s": r3(run.wall_s),
        "dispatch_expand_items": expand,
        "dispatch_items": items,
        "dispatch_tasks": run.summary.get("tasks_sent", 0),
        "dispatch_tasks_per_s": round(expand / run.wall_s, 1),
        "dispatch_items_per_s": round(items / run.wall_s, 1),
        "dispatch_celery_tasks_per_s": round(run.summary.get("tasks_sent", 0) / run.wall_s, 1),
        "step_latency_p50_s": r3(percentile(run.step_latencies, 50)),
        "step_latency_p99_s": r3(percentile(run.step_latencies, 99)),
        "dispatch_steps_per_s": round(run.steps / run.wall_s, 1),
        "machine": info,
    }
    click.echo(
        f"{problems} problems x {steps} steps on the bench engine, "
        f"{figures['dispatch_workers']} workers, max_in_flight {max_in_flight}: "
        f"{expand} expansions ({items} items in {figures['dispatch_tasks']} tasks) in "
        f"{run.wall_s:.1f}s; {run.cpu_line()}"
    )
    emit(figures, json_path)


@main.command()
@url_option
@click.option("--problems", default=10000, show_default=True)
@click.option("--workers-per-pool", default=1, show_default=True)
@click.option("--steps", default=4, show_default=True, help="Steps per trajectory.")
@json_option
def memory(
    redis_url: str, problems: int, workers_per_pool: int, steps: int, json_path: str | None
) -> None:
    """Coordinator memory with every problem in flight at once (max_in_flight = problems)
    on the bench engine; Redis memory; steps per second. Run it in a fresh process: the
    peak RSS is this process's (it is the coordinator)."""
    info = machine()
    base_rss = rss_mib()[0]
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as tmp, redis_at(redis_url, Path(tmp)):
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        data = fleet_dict(redis_url, ns, engine="bench", bench_steps=steps, max_in_flight=problems)
        fleet = BenchFleet(data, Path(tmp), workers_per_pool)
        client = fleet.client
        redis_before = int(client.info("memory")["used_memory"])
        sampler = RedisSampler(client)
        try:
            fleet.up()
            sampler.start()
            run = run_fleet(fleet.cfg, synthetic_problems(problems, "m"))
        finally:
            sampler.stop()
            fleet.stop()
    peak = rss_mib()[1]
    figures = {
        "memory_problems": problems,
        "memory_done": len(run.rows),
        "memory_failed": run.failed,
        "memory_peak_in_flight": run.peak_in_flight,
        "memory_wall_s": r3(run.wall_s),
        "coordinator_rss_mib_10k": round(peak, 1),
        "coordinator_rss_mib_before": round(base_rss, 1),
        "coordinator_rss_mib_all_admitted": round(run.rss_at_peak_mib, 1),
        "redis_used_mib_peak": round((sampler.peak - redis_before) / 2**20, 1),
        "memory_steps_per_s": round(run.steps / run.wall_s, 1),
        "memory_expand_items_per_s": round(
            run.summary.get("by_kind", {}).get("expand", 0) / run.wall_s, 1
        ),
        "machine": info,
    }
    click.echo(
        f"{problems} problems in flight at once on the bench engine: coordinator peak RSS "
        f"{peak:.0f} MiB (at start {base_rss:.0f}), Redis +{figures['redis_used_mib_peak']} MiB, "
        f"{figures['memory_steps_per_s']} steps/s, {run.wall_s:.1f}s"
    )
    emit(figures, json_path)


def soak_wave(
    fleet: BenchFleet,
    store: Store,
    coord: Coordinator,
    thread: threading.Thread,
    wave: int,
    problems: int,
) -> tuple[int, float]:
    """One wave: its problems in, a worker stopped mid-wave (SIGKILL and SIGTERM in turn)
    and replaced, the wave drained; then what the coordinator still keeps per problem or
    task (0 is right) and its RSS (MiB)."""
    store.enqueue(synthetic_problems(problems, f"w{wave}"))
    time.sleep(0.3)  # work is out: the stop lands mid-wave
    sig = signal.SIGKILL if wave % 2 == 0 else signal.SIGTERM
    fleet.replace_worker(wave % len(fleet.workers), sig)
    want = (wave + 1) * problems
    deadline = time.monotonic() + 300
    while sum(store.counts()[k] for k in ("done", "failed")) < want:
        if time.monotonic() > deadline or not thread.is_alive():
            raise click.ClickException(f"wave {wave} did not drain")
        time.sleep(0.1)
    time.sleep(0.5)  # the last rows' bookkeeping closes on the next pass
    return sum(coord.sizes().values()), rss_mib()[0]


@main.command()
@url_option
@click.option("--waves", default=8, show_default=True)
@click.option("--problems", default=40, show_default=True, help="Problems per wave.")
@click.option("--steps", default=4, show_default=True, help="Steps per trajectory.")
@json_option
def soak(redis_url: str, waves: int, problems: int, steps: int, json_path: str | None) -> None:
    """One `--follow` coordinator (this process) while waves of problems come in and a
    worker is stopped in every wave, SIGKILL and SIGTERM in turn, and replaced: how much
    of its in-flight bookkeeping is left once each wave has drained (0 is right), and
    its RSS after the first wave and after the last, on the bench engine."""
    info = machine()
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as tmp, redis_at(redis_url, Path(tmp)):
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        # Tasks of 50 ms: a stop lands while its worker runs one.
        data = fleet_dict(redis_url, ns, engine="bench", bench_steps=steps, bench_ms=50)
        # Lost workers are found within seconds, so each wave drains quickly.
        data["reliability"].update(heartbeat_s=0.5, worker_lost_s=3.0, shutdown_grace_s=0.5)
        fleet = BenchFleet(data, Path(tmp))
        store = Store(fleet.client, Keys(ns))
        try:
            fleet.up()
            with tempfile.TemporaryDirectory(prefix="cord-bench-") as out:
                coord = Coordinator(fleet.cfg, out, follow=True)
                thread = threading.Thread(target=coord.run, daemon=True)
                thread.start()
                start = time.perf_counter()
                left, rss = zip(
                    *(soak_wave(fleet, store, coord, thread, w, problems) for w in range(waves)),
                    strict=True,
                )
                wall = time.perf_counter() - start
                coord.stop()
                thread.join(30)
                counts = store.counts()
                counters = coord.counters
        finally:
            fleet.stop()
    figures = {
        "follow_waves": waves,
        "follow_problems": waves * problems,
        "follow_done": counts["done"],
        "follow_failed": counts["failed"],
        "follow_workers_stopped": waves,
        "follow_redispatched": counters.redispatched,
        "follow_rerouted": counters.rerouted,
        "follow_wall_s": r3(wall),
        "follow_inflight_after_drain_max": max(left),
        "follow_coordinator_rss_mib_first_wave": round(rss[0], 1),
        "follow_coordinator_rss_mib_last_wave": round(rss[-1], 1),
        "follow_inflight_after_drain": left[-1],
        "machine": info,
    }
    click.echo(
        f"{waves} waves of {problems} problems under --follow, a worker stopped in each: "
        f"{counts['done']} done, {counts['failed']} failed, {counters.redispatched} items "
        f"re-sent; left in flight after each drain {list(left)}; RSS {rss[0]:.0f} -> "
        f"{rss[-1]:.0f} MiB; {wall:.1f}s"
    )
    emit(figures, json_path)


@main.command()
@url_option
@click.option("--problems", default=24, show_default=True)
@click.option("--warmup", default=2, show_default=True, help="Untimed problems first.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--model", default=None, help="One model path for every pool (default: the lab's).")
@click.option(
    "--inproc-threads",
    default="1,2",
    show_default=True,
    help="torch threads of the one-process baseline; the fastest is the baseline.",
)
@click.option(
    "--curation/--no-curation",
    default=True,
    show_default=True,
    help="Also run curation (N matched to CoRD's tokens) through the same fleet.",
)
@click.option(
    "--pairs",
    default=5,
    show_default=True,
    help="CoRD/curation pairs, each on problems of its own, the order alternating; "
    "cord_vs_curation_wall_ratio is the median of the pairs' ratios.",
)
@json_option
def overhead(
    redis_url: str,
    problems: int,
    warmup: int,
    device: str,
    model: str | None,
    inproc_threads: str,
    curation: bool,
    pairs: int,
    json_path: str | None,
) -> None:
    """CoRD through the fleet (one worker per pool, one torch thread each) against the
    same search in one process on the same problems; then curation through the fleet,
    in `pairs` CoRD/curation pairs.

    One run of each is a poor figure on a shared machine: the same run's CPU time
    varies by 15% from one minute to the next here. So the pairs run back to back, each
    on problems of its own (workers keep their prefix caches between runs: CoRD again
    on the same problems would find its trajectories cached), the order alternating
    (the second run of a pair finds the questions cached); the figure is the median of
    the pairs' ratios, and their spread is printed beside it."""
    # The engines in this process: torch is imported only here, never in the runs that
    # measure this process's memory (soak, memory, backlog).
    from inprocess import baselines, overhead_figures

    info = machine()
    threads = [int(t) for t in inproc_threads.split(",") if t.strip()]
    todo = lab_problems(problems, SEED)
    warm = lab_problems(warmup, WARMUP_SEED)
    figures: dict[str, Any] = {"overhead_problems": problems, "overhead_device": device}
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as tmp, redis_at(redis_url, Path(tmp)):
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        # One process, before any worker exists: nothing else competes for the cores.
        by_threads = {
            t: config_from_dict(
                fleet_dict(redis_url, ns, model=model, device=device, cpu_threads=t)
            )
            for t in threads
        }
        inproc = baselines(by_threads, todo, warm, device)
        data = fleet_dict(redis_url, ns, model=model, device=device, cpu_threads=1)
        fleet = BenchFleet(data, Path(tmp), 1)
        try:
            figures["overhead_worker_start_s"] = r3(fleet.up())
            if warm:
                run_fleet(fleet.cfg, warm)
            run = run_fleet(fleet.cfg, todo, fleet=fleet)
            click.echo(f"fleet, cord: {run.wall_s:.1f}s; {run.cpu_line()}", err=True)
            pairs_run = cord_curation_pairs(fleet, run, problems, pairs) if curation else None
        finally:
            fleet.stop()
    figures.update(overhead_figures(inproc, run))
    if pairs_run is not None:
        figures.update(pairs_run.figures())
    if device.startswith("cuda"):
        info["gpu"] = gpu_name()
    figures["machine"] = info
    emit(figures, json_path)


@main.command()
@url_option
@click.option("--problems", default=16, show_default=True, help="Problems per run.")
@click.option("--workers-per-pool", default=2, show_default=True)
@json_option
def cache(redis_url: str, problems: int, workers_per_pool: int, json_path: str | None) -> None:
    """Prefix-cache hit share with two workers per pool, routing.affinity on and off.
    Each run gets fresh workers (empty caches) and the same problems."""
    info = machine()
    todo = lab_problems(problems, SEED)
    figures: dict[str, Any] = {
        "cache_problems": problems,
        "cache_workers_per_pool": workers_per_pool,
    }
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as tmp, redis_at(redis_url, Path(tmp)):
        for affinity in (True, False):
            ns = f"bench-{uuid.uuid4().hex[:8]}"
            fleet = BenchFleet(
                fleet_dict(redis_url, ns, affinity=affinity), Path(tmp), workers_per_pool
            )
            try:
                fleet.up()
                run = run_fleet(fleet.cfg, todo)
            finally:
                fleet.stop()
            tag = "affinity" if affinity else "no_affinity"
            figures[f"prefix_cache_hit_{tag}"] = cache_share(run.rows)
            figures[f"cache_{tag}_wall_s"] = r3(run.wall_s)
            figures[f"cache_{tag}_done"] = len(run.rows)
            click.echo(
                f"affinity {affinity}: prefix-cache hit share {cache_share(run.rows)}, "
                f"{run.wall_s:.1f}s",
                err=True,
            )
    figures["machine"] = info
    emit(figures, json_path)


if __name__ == "__main__":
    main()
