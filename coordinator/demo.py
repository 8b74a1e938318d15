"""``cord-coord demo``: the whole fleet on one machine, start to finish.

Starts a local Redis (with AOF) if none answers at the config's URL and one `cord-worker`
process per pool (`fleet.LocalFleet`), enqueues the problems, runs the coordinator,
prints a summary, then stops everything it started (the whole process tree, also on
Ctrl-C or an error).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from cord.common.config import RunConfig
from cord.coordinator.fleet import FleetError, LocalFleet
from cord.coordinator.matching import stated_answer
from cord.coordinator.rows import Summary, TraceRow, summarize
from cord.coordinator.rundir import read_failures, read_traces


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


def run_demo(
    cfg: RunConfig, config_path: str, problems: str, out_dir: Path, fresh: bool, run_dir: Path
) -> None:
    from cord.coordinator.driver import Coordinator
    from cord.coordinator.inputs.intake import enqueue_file

    with LocalFleet(config_path, run_dir, cfg=cfg, echo=click.echo) as fleet:
        try:
            fleet.up()
        except FleetError as e:
            raise click.ClickException(str(e)) from e
        if fresh:
            fleet.wipe(keep_workers=True)
            for name in (f"{cfg.output.traces_prefix}.jsonl", f"{cfg.output.failed_prefix}.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
        report = enqueue_file(cfg, problems)
        if report.errors:
            raise click.UsageError("\n".join(str(e) for e in report.errors))
        click.echo(f"enqueued {report.added} problem(s) from {problems}")
        start = time.monotonic()
        coord = Coordinator(cfg, str(out_dir))
        coord.run()
        rows = read_traces(coord.writer.traces)
        summary = summarize(rows, read_failures(coord.writer.failed))
        print_summary(rows, summary, coord.writer.traces, time.monotonic() - start)
