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
from typing import Any

import click
import redis

from cord.common.config import RunConfig
from cord.common.keys import Keys
from cord.coordinator.matching import MatchMethod, row_correct, stated_answer
from cord.coordinator.redis_server import ping, start_redis
from cord.coordinator.rundir import read_jsonl


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


def summarize(traces: Path, failed: Path, match: MatchMethod = "math") -> dict[str, Any]:
    """The run's figures. A row is right as its `correct` says (`match` decides for rows
    written without one)."""
    rows, fails = read_jsonl(traces), read_jsonl(failed)
    correct = sum(row_correct(r, match) for r in rows)
    teachers: dict[str, int] = {}
    for r in rows:
        for s in r["steps"]:
            teachers[s["teacher"]] = teachers.get(s["teacher"], 0) + 1
    prompt = sum(r["stats"]["prompt_tokens"] for r in rows)
    cached = sum(r["stats"]["cached_prompt_tokens"] for r in rows)
    return {
        "traces": len(rows),
        "failed": len(fails),
        "accuracy": round(correct / len(rows), 3) if rows else None,
        "mean_score": round(sum(r["score"] for r in rows) / len(rows), 4) if rows else None,
        "mean_steps": round(sum(len(r["steps"]) for r in rows) / len(rows), 2) if rows else None,
        "chosen_steps_by_teacher": teachers,
        "prefix_cache_hit": round(cached / prompt, 3) if prompt else None,
        "match": match,
        "rows": rows,
    }


def print_summary(summary: dict[str, Any], out_dir: Path, wall_s: float) -> None:
    click.echo("")
    click.echo(
        f"{'id':<18} {'reference':>9} {'answer':>8} {'ok':>3} {'S':>7} {'steps':>5}  teachers"
    )
    for r in summary["rows"][:20]:
        got = stated_answer(r["final_answer"] or "") or "-"
        ok = "yes" if row_correct(r, summary.get("match", "math")) else "no"
        who = "".join(s["teacher"][0] for s in r["steps"])
        click.echo(
            f"{r['id'][:18]:<18} {r['reference_answer']:>9} {got[:8]:>8} {ok:>3} "
            f"{r['score']:>7.4f} {len(r['steps']):>5}  {who}"
        )
    if len(summary["rows"]) > 20:
        click.echo(f"... and {len(summary['rows']) - 20} more")
    click.echo("")
    click.echo(
        f"traces {summary['traces']}, failed {summary['failed']}, "
        f"answer accuracy {summary['accuracy']}, mean S {summary['mean_score']}, "
        f"mean steps {summary['mean_steps']}"
    )
    click.echo(
        f"chosen steps by teacher {summary['chosen_steps_by_teacher']}, "
        f"prefix-cache hit share {summary['prefix_cache_hit']}, wall {wall_s:.1f}s"
    )
    click.echo(f"dataset: {out_dir / 'traces.jsonl'}")


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
        Coordinator(cfg, str(out_dir)).run()
        summary = summarize(
            out_dir / f"{cfg.output.traces_prefix}.jsonl",
            out_dir / f"{cfg.output.failed_prefix}.jsonl",
            cfg.eval.match,
        )
        print_summary(summary, out_dir, time.monotonic() - start)
