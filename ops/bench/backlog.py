"""A backlog of a million problems: enqueueing it, and a coordinator drawing from it.

    python ops/bench/backlog.py --problems 1000000 --admit-seconds 75 [--json PATH]

1. Writes `--problems` lab problems (``cord.lab.arith.iter_problems(n, seed)``:
   `make_problems`'s, one at a time, streamed to disk) to a temporary JSONL file, as
   ``cord-coord lab-problems`` prints them.
2. Times ``cord-coord enqueue`` on it, run as a subprocess into a fresh namespace:
   wall seconds (`enqueue_1m_s`), the subprocess's peak RSS (`enqueue_rss_mib_1m`, its
   VmHWM, watched while it runs: `harness.run_watched`) and Redis ``used_memory`` after
   it over before (`redis_mib_1m`; `redis_peak_mib_1m` is the peak, sampled twice a second). The
   enqueue's config names the lab models on the `hf` engine (enqueue loads no model;
   `cord-coord` refuses the `bench` engine).
3. Starts the fleet of ``fleet.py memory`` (one `cord-worker` per pool on the `bench`
   engine, through ``fleet.py worker``) on that namespace and runs the coordinator in
   this process, in a thread, with ``max_in_flight: 10000`` for `--admit-seconds`, then
   stops it (its unfinished problems are handed back). This process imports no torch,
   so its peak RSS (`admit_backlog_rss_mib`, VmHWM) is the coordinator's (plus the
   harness's few MiB: the file is streamed, the enqueue is another process);
   `admit_backlog_steps_per_s` is the coordinator's committed search steps
   (`Counters.steps`) over the wall time, `admit_backlog_timer_steps_per_s` the same
   count ``fleet.py memory`` reports as `memory_steps_per_s` (a `StepTimer`), to compare
   with it: 10,000 in flight there too, but with only those 10,000 enqueued.
4. Drops the namespace (the whole backlog) and prints the figures, then ``name=value``
   lines (``--json`` also writes them). Names ending in ``_1m`` keep the suffix at any
   `--problems` (`backlog_problems` states the size).

A Redis is started if none answers at `--redis-url`. Rows of the `bench` engine are
placeholders: they go to a temporary folder deleted at the end.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import click
import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    BenchFleet,
    RedisSampler,
    StepTimer,
    default_redis_url,
    emit,
    fleet_dict,
    machine,
    r3,
    redis_at,
    rss_mib,
    run_watched,
)

from cord.common import env
from cord.common.config import allow_bench_engine
from cord.common.keys import Keys
from cord.common.log import configure
from cord.coordinator.driver import Coordinator
from cord.coordinator.fleet import wipe_namespace
from cord.lab.arith import iter_problems

# Not a seed of the lab's training, evaluation or demo sets, nor of fleet.py's.
BACKLOG_SEED = 4244
MAX_IN_FLIGHT = 10_000


def write_problems(path: Path, n: int, seed: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in iter_problems(n, seed):
            f.write(json.dumps(p.to_json()) + "\n")


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def enqueue(config: Path, problems: Path, redis_url: str) -> tuple[float, float, str]:
    """``cord-coord enqueue`` as a subprocess: (wall s, its peak RSS MiB, its output)."""
    child_env = {**env.run_scoped(), env.REDIS_URL: redis_url}
    args = [sys.executable, "-m", "cord.coordinator.cli", "enqueue"]
    cmd = [*args, "--config", str(config), str(problems)]
    status, output, wall, peak = run_watched(cmd, child_env)
    if status != 0:
        raise click.ClickException(f"cord-coord enqueue exited {status}:\n{output}")
    return wall, peak, output.strip()


def timed_enqueue(client: redis.Redis, config: Path, path: Path, redis_url: str) -> dict[str, Any]:
    """`enqueue`'s figures: its wall time and peak RSS, and what Redis holds after it."""
    before = used_memory(client)
    sampler = RedisSampler(client)
    sampler.start()
    try:
        wall, rss, output = enqueue(config, path, redis_url)
    finally:
        sampler.stop()
    after = used_memory(client)
    click.echo(output, err=True)
    figures = {
        "enqueue_1m_s": r3(wall),
        "enqueue_rss_mib_1m": round(rss, 1),
        "redis_mib_1m": round((after - before) / 2**20, 1),
        "redis_peak_mib_1m": round((max(sampler.peak, after) - before) / 2**20, 1),
    }
    click.echo(
        f"enqueue of {path.name}: {wall:.1f}s, peak RSS {rss:.0f} MiB, "
        f"Redis +{figures['redis_mib_1m']} MiB",
        err=True,
    )
    return figures


def admit(fleet: BenchFleet, seconds: float) -> dict[str, Any]:
    """The coordinator (this process) on the fleet's namespace for `seconds`."""
    timer = StepTimer(MAX_IN_FLIGHT)
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as out:
        coord = Coordinator(fleet.cfg, out, observer=timer)
        timer.coordinator = coord
        rss_before = rss_mib()[0]
        thread = threading.Thread(target=coord.run, daemon=True)
        start = time.perf_counter()
        thread.start()
        fill_s: float | None = None
        while (elapsed := time.perf_counter() - start) < seconds:
            if fill_s is None and len(coord.searches) >= MAX_IN_FLIGHT:
                fill_s = elapsed
            if not thread.is_alive():  # the whole backlog is done (a small --problems)
                break
            time.sleep(0.1)
        steps = coord.counters.steps
        timer_steps = timer.steps
        wall = time.perf_counter() - start
        in_flight = len(coord.searches)
        coord.stop()
        thread.join(120)
        if thread.is_alive():
            raise click.ClickException("the coordinator did not stop")
        counters = coord.counters
    return {
        "admit_backlog_seconds": r3(wall),
        "admit_backlog_fill_s": r3(fill_s),
        "admit_backlog_rss_mib": round(rss_mib()[1], 1),
        "admit_backlog_rss_mib_before": round(rss_before, 1),
        "admit_backlog_rss_mib_end": round(rss_mib()[0], 1),
        "admit_backlog_steps": steps,
        "admit_backlog_steps_per_s": round(steps / wall, 1),
        "admit_backlog_timer_steps_per_s": round(timer_steps / wall, 1),
        "admit_backlog_done": counters.done,
        "admit_backlog_failed": counters.failed,
        "admit_backlog_in_flight_at_stop": in_flight,
        "admit_backlog_tasks": counters.tasks_sent,
    }


@click.command()
@click.option("--problems", default=1_000_000, show_default=True, help="Size of the backlog.")
@click.option(
    "--redis-url",
    default=default_redis_url,
    show_default="CORD_REDIS_URL or " + env.DEFAULT_REDIS_URL,
    help="Redis to use; started here (on that port) when none answers.",
)
@click.option("--json", "json_path", default=None, help="Also write figures here.")
@click.option(
    "--admit-seconds", default=75.0, show_default=True, help="How long the coordinator runs."
)
@click.option("--steps", default=4, show_default=True, help="Steps per trajectory (bench).")
def main(
    problems: int, redis_url: str, json_path: str | None, admit_seconds: float, steps: int
) -> None:
    """Enqueue a backlog of lab problems, then run the coordinator on it (module doc)."""
    configure(level="WARNING")
    allow_bench_engine()  # this harness only; its bench rows never leave a temp folder
    env.unset(env.NAMESPACE)  # each run picks its own namespace
    info = machine()
    figures: dict[str, Any] = {"backlog_problems": problems}
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as tmp, redis_at(redis_url, Path(tmp)):
        workdir = Path(tmp)
        path = workdir / "backlog.jsonl"
        start = time.perf_counter()
        write_problems(path, problems, BACKLOG_SEED)
        figures["backlog_generate_s"] = r3(time.perf_counter() - start)
        figures["backlog_file_mb"] = round(path.stat().st_size / 1e6, 1)

        ns = f"bench-{uuid.uuid4().hex[:8]}"
        config = workdir / "enqueue.yaml"
        config.write_text(yaml.safe_dump(fleet_dict(redis_url, ns)), encoding="utf-8")
        client = redis.Redis.from_url(redis_url)
        try:
            figures.update(timed_enqueue(client, config, path, redis_url))
            path.unlink()  # the backlog is in Redis now; the file's disk is not needed
            data = fleet_dict(
                redis_url, ns, engine="bench", bench_steps=steps, max_in_flight=MAX_IN_FLIGHT
            )
            fleet = BenchFleet(data, workdir)
            try:
                fleet.up()
                figures.update(admit(fleet, admit_seconds))
                start = time.perf_counter()
                wipe_namespace(client, Keys(ns))  # the backlog: all problems not done
                figures["backlog_drop_s"] = r3(time.perf_counter() - start)
            finally:
                fleet.stop()  # its queues and heartbeats (and the namespace, if we failed)
        finally:
            wipe_namespace(client, Keys(ns))
            client.close()
    figures["admit_backlog_imported_torch"] = "torch" in sys.modules  # must be False
    figures["machine"] = info
    click.echo(
        f"coordinator on a backlog of {problems}, {MAX_IN_FLIGHT} in flight, "
        f"{figures['admit_backlog_seconds']}s: peak RSS {figures['admit_backlog_rss_mib']} MiB "
        f"(before {figures['admit_backlog_rss_mib_before']}), "
        f"{figures['admit_backlog_steps_per_s']} steps/s, {figures['admit_backlog_done']} done, "
        f"{figures['admit_backlog_in_flight_at_stop']} in flight at the stop "
        f"({MAX_IN_FLIGHT} after {figures['admit_backlog_fill_s']}s)",
        err=True,
    )
    emit(figures, json_path)


if __name__ == "__main__":
    main()
