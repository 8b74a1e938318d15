"""``cord-coord demo``: the whole fleet on one machine, start to finish.

Starts a local Redis (with AOF) if none answers at the config's URL, one `cord-worker`
process per pool, enqueues the problems, runs the coordinator, prints a summary, then
stops everything it started (the whole process tree, also on Ctrl-C or an error).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import redis

from cord.common.config import RunConfig
from cord.common.keys import Keys
from cord.coordinator.matching import stated_answer
from cord.coordinator.redis_server import ping, start_redis
from cord.coordinator.rows import Summary, TraceRow, summarize
from cord.coordinator.rundir import read_failures, read_traces


class ProcessGroup:
    """Child processes, each in its own session, killed as a tree on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, args: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]

    def tail(self, name: str, chars: int = 2000) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")[-chars:]

    def stop(self, grace_s: float = 15.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def clear_namespace(client: redis.Redis, ns: str) -> None:
    """What an earlier run left in `ns` (problems, state, queues), but not the worker
    registry: the workers of this run have registered already, and a task they run
    before their next heartbeat would look lost (the vLLM demo re-sent a first task of
    24 items that way)."""
    keys = Keys(ns)
    live = keys.alive("")
    for pattern in (f"{ns}:*", f"{ns}.*"):
        found = [
            k
            for k in client.scan_iter(match=pattern, count=1000)
            if k.decode() != keys.workers and not k.decode().startswith(live)
        ]
        if found:
            client.delete(*found)


def wait_for_workers(
    cfg: RunConfig, group: ProcessGroup, client: redis.Redis, timeout_s: float | None = None
) -> None:
    """Until every pool has a worker; 300 s, or as long as a pool's server may take to
    start (`startup_timeout_s`) when that is longer."""
    if timeout_s is None:
        starts = [getattr(cfg.pool(n), "startup_timeout_s", 0.0) for n in cfg.model_names]
        timeout_s = max([300.0, *starts])
    want = len(cfg.model_names)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.hlen(Keys(cfg.namespace).workers) >= want:
            return
        if dead := group.dead():
            raise click.ClickException(
                f"worker {dead[0]} exited while loading:\n{group.tail(dead[0])}"
            )
        time.sleep(0.3)
    raise click.ClickException(f"workers not ready after {timeout_s:.0f}s; see {group.log_dir}")


def print_summary(rows: list[TraceRow], summary: Summary, traces: Path, wall_s: float) -> None:
    """A line per problem (the first 20), then the run's figures (`rows.summarize`)."""
    click.echo("")
    click.echo(
        f"{'id':<18} {'reference':>9} {'answer':>8} {'ok':>3} {'S':>7} {'steps':>5}  teachers"
    )
    for r in rows[:20]:
        got = stated_answer(r.final_answer) or "-"
        ok = "yes" if r.right else "no"
        who = "".join(t[0] for t in r.teachers)
        click.echo(
            f"{r.id[:18]:<18} {r.reference_answer:>9} {got[:8]:>8} {ok:>3} "
            f"{r.score:>7.4f} {len(r.steps):>5}  {who}"
        )
    if len(rows) > 20:
        click.echo(f"... and {len(rows) - 20} more")
    click.echo("")
    click.echo(
        f"traces {summary.traces}, failed {summary.failed}, "
        f"answer accuracy {_round(summary.accuracy, 3)}, "
        f"mean S {_round(summary.mean_score, 4)}, mean steps {_round(summary.mean_steps, 2)}"
    )
    click.echo(
        f"chosen steps by teacher {summary.steps_by_teacher}, "
        f"prefix-cache hit share {_round(summary.cache_hit_share, 3)}, wall {wall_s:.1f}s"
    )
    click.echo(f"dataset: {traces}")


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


@contextmanager
def local_fleet(cfg: RunConfig, config_path: str, run_dir: Path) -> Iterator[redis.Redis]:
    """A Redis (started here if none answers) and one `cord-worker` per pool, for as long
    as the block runs; everything started here is stopped after it, whatever happens."""
    redis_proc = None
    if not ping(cfg.redis_url):
        click.echo(
            f"no Redis answers at the config's URL; starting one (AOF in {run_dir / 'redis'})"
        )
        redis_proc = start_redis(cfg.redis_url, run_dir / "redis")
    client = redis.Redis.from_url(cfg.redis_url)
    group = ProcessGroup(run_dir / "logs")
    try:
        host = os.uname().nodename
        for model in cfg.model_names:
            group.start(
                model,
                [
                    sys.executable,
                    "-m",
                    "cord.workers.cli",
                    "--config",
                    config_path,
                    "--teacher",
                    model,
                    "--name",
                    f"{model}-local@{host}",
                ],
            )
        click.echo(
            f"starting {len(cfg.model_names)} workers ({', '.join(cfg.model_names)}); "
            f"logs in {group.log_dir}"
        )
        wait_for_workers(cfg, group, client)
        yield client
    finally:
        group.stop()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)


def run_demo(
    cfg: RunConfig, config_path: str, problems: str, out_dir: Path, fresh: bool, run_dir: Path
) -> None:
    from cord.coordinator.driver import Coordinator
    from cord.coordinator.inputs.intake import enqueue_file

    with local_fleet(cfg, config_path, run_dir) as client:
        if fresh:
            clear_namespace(client, cfg.namespace)
            for name in (f"{cfg.output.traces_prefix}.jsonl", f"{cfg.output.failed_prefix}.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
        report = enqueue_file(cfg, problems)
        if report.errors:
            raise click.ClickException("\n".join(str(e) for e in report.errors))
        click.echo(f"enqueued {report.added} problem(s) from {problems}")
        start = time.monotonic()
        coord = Coordinator(cfg, str(out_dir))
        coord.run()
        rows = read_traces(coord.writer.traces)
        summary = summarize(rows, read_failures(coord.writer.failed))
        print_summary(rows, summary, coord.writer.traces, time.monotonic() - start)
