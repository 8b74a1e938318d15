"""Chaos run: the fleet on the lab models while its parts are killed, then a check that
every problem came out exactly once.

    python ops/chaos.py                      # make chaos: 100 problems, 2 workers per model
    python ops/chaos.py --problems 12 --workers-per-model 1 --no-calm --json   # CI's short one
    python ops/chaos.py --redis-failover     # make chaos-failover: Redis behind Sentinel
    python ops/chaos.py --problems my.jsonl  # your problems (the lab's tiny models answer)

What happens, on a private Redis (AOF on) started here on a free port:
  1. calm: the problems run once with nothing killed (the wall time to compare with);
  2. chaos: the same problems again, from a clean namespace state, while
     - a random worker is killed with SIGKILL every ``--kill-every`` seconds and started
       again at once,
     - ``--sigterms`` workers get SIGTERM (a spot notice) and must exit 0 within their
       grace period, then are started again,
     - the coordinator is killed with SIGKILL ``--coordinator-kills`` times and started
       again (it resumes from the committed state in Redis),
     - Redis is restarted ``--redis-restarts`` times (SIGTERM, then started on its AOF).

With ``--redis-failover`` Redis is a primary, a replica and three Sentinels (local
processes, `SentinelGroup`), and the fleet runs on the Sentinel URL:
  1. calm: the problems with one coordinator, then again with two side by side (what a
     standby costs in steps/s);
  2. chaos: two ``cord-coord run --follow`` on the same output folder, while
     - the primary is SIGKILLed ``--failovers`` times: the Sentinels promote the replica,
       the old primary is started again and becomes the replica; the next failover waits
       until it is in sync (a replica that is not cannot be promoted),
     - workers are SIGKILLed and SIGTERMed as above,
     - a coordinator is SIGKILLed ``--coordinator-kills`` times and a new one started in
       its place (as Kubernetes restarts a pod); the other takes its problems over when
       their lease runs out;
   until every problem has its row; then the coordinators are stopped (SIGTERM).

Then: every id exactly once across traces and failures, rows valid, and the figures.
The last line is ``chaos_ok=1`` (or 0), for scripts. Exit status 1 when a check fails.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from cord.common.metrics import free_port
from cord.coordinator.fleet import Child, LocalFleet
from cord.coordinator.output import RowIndex
from cord.coordinator.redis_server import LocalRedis, SentinelGroup
from cord.coordinator.rows import FailureRow, TraceRow, summarize
from cord.coordinator.rundir import read_rows
from cord.lab.arith import make_problems

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Figures:
    worker_kills: int = 0
    sigterms: int = 0
    sigterm_exit_codes: list[int | None] = field(default_factory=list)
    sigterm_exit_s: list[float] = field(default_factory=list)
    coordinator_kills: int = 0
    redis_restarts: int = 0
    failovers: int = 0
    failover_s: list[float] = field(default_factory=list)  # primary killed -> promoted
    coordinator_starts: int = 0


class Chaos:
    """The fleet (`LocalFleet`) on a private Redis with AOF, and the faults done to it."""

    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        workers_per_model: int,
        sentinel_ports: tuple[int, int] | None = None,
    ) -> None:
        self.config_path = workdir / "chaos.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        private: LocalRedis | SentinelGroup
        if sentinel_ports is None:
            private = LocalRedis(config["redis_url"], workdir / "redis", appendonly=True)
        else:  # quick to notice a dead primary, as the other timings here are
            private = SentinelGroup(
                config["redis_url"], workdir / "redis", sentinel_ports, 1000, 5000
            )
        self.fleet = LocalFleet(
            self.config_path,
            workdir,
            workers_per_pool=workers_per_model,
            tag="chaos",
            local_redis=private,
        )
        self.redis = private
        self.figures = Figures()
        self.enqueued: list[str] = []  # the ids of the last enqueue
        # Workers SIGTERMed, until they have exited: (index, worker, when)
        self.terminating: list[tuple[int, Child, float]] = []

    @property
    def coordinator(self) -> Child | None:
        """The coordinator started last (the others were killed)."""
        return self.fleet.coordinators[-1] if self.fleet.coordinators else None

    @property
    def logs(self) -> Path:
        return self.fleet.logs

    def start(self) -> None:
        self.redis.start()  # on free ports: never one that was running
        self.fleet.up()

    def stop(self) -> None:
        self.fleet.stop(grace_s=0.0)  # SIGKILL: nothing to drain
        self.redis.stop()

    def pick_for_sigterm(self, rng: random.Random) -> int:
        """A worker in the middle of a task if there is one (the case that matters),
        else one that serves; a spot notice can also hit a loading worker, but that is
        the easy case."""
        keys, client = self.fleet.keys, self.fleet.client
        running = {v.decode() for v in client.hvals(keys.running)}
        serving = {k.decode() for k in client.hkeys(keys.workers)}
        workers = self.fleet.workers
        for pool in (running, serving):
            found = [i for i, w in enumerate(workers) if w.node in pool and w.alive()]
            if found:
                return rng.choice(found)
        return rng.randrange(len(workers))

    def start_coordinator(self, out: Path) -> None:
        self.figures.coordinator_starts += 1
        self.fleet.start_coordinator(out)

    def enqueue(self, problems: Path) -> list[str]:
        """The problems again, from a clean namespace (the workers stay registered); the
        ids Redis holds (those every run must bring out)."""
        self.fleet.wipe(keep_workers=True)
        args = [sys.executable, "-m", "cord.coordinator.cli", "enqueue"]
        args += ["--config", str(self.config_path), str(problems)]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        held = self.fleet.client.hkeys(self.fleet.keys.problems)
        self.enqueued = sorted(k.decode() for k in held)
        return self.enqueued

    # -- runs -------------------------------------------------------------------------
    def calm(self, problems: Path, out: Path, max_wall_s: float) -> float:
        self.enqueue(problems)
        start = time.monotonic()
        self.start_coordinator(out)
        assert self.coordinator is not None
        code = self.coordinator.wait(max_wall_s)
        if code != 0:
            raise click.ClickException(f"calm run ended with {code}; see {self.logs}")
        return time.monotonic() - start

    def chaos(self, problems: Path, out: Path, plan: Plan, rng: random.Random) -> float:
        """The problems through the fleet while `plan`'s faults happen; the wall time."""
        self.enqueue(problems)
        start = time.monotonic()
        self.start_coordinator(out)
        self._under_faults(
            plan,
            rng,
            start,
            done=lambda: self._coordinator_done(out),
            fault=lambda what, now: self._fault(what, out, rng, now),
        )
        return time.monotonic() - start

    def _under_faults(
        self,
        plan: Plan,
        rng: random.Random,
        start: float,
        done: Callable[[], bool],
        fault: Callable[[str, float], None],
        watch: Callable[[], None] = lambda: None,
    ) -> None:
        """Until `done()`: each of `plan`'s faults when it is due (`fault`), a worker
        SIGKILLed every ``kill_every_s``, SIGTERMed workers replaced once they exit, and
        `watch` on every pass."""
        faults = plan.faults()
        next_kill = start + plan.kill_every_s
        while not done():
            now = time.monotonic()
            if now - start > plan.max_wall_s:
                raise click.ClickException(
                    f"chaos run passed {plan.max_wall_s:.0f}s; see {self.logs}"
                )
            while faults and now - start >= faults[0][0]:
                fault(faults.pop(0)[1], now)
            watch()
            self._replace_terminated(now)
            if now >= next_kill:
                self._kill_a_worker(rng)
                next_kill = now + plan.kill_every_s
            time.sleep(0.2)

    def _coordinator_done(self, out: Path) -> bool:
        """Whether the coordinator finished (exit 0); one that died unasked is a finding,
        and is started again."""
        assert self.coordinator is not None
        code = self.coordinator.popen.poll() if self.coordinator.popen else None
        if code is not None and code != 0:
            click.echo(f"coordinator exited {code} unasked; starting it again", err=True)
            self.start_coordinator(out)
        return code == 0

    def _fault(self, what: str, out: Path, rng: random.Random, now: float) -> None:
        if what == "sigterm":  # a spot notice: the worker must exit 0 in its grace period
            index = self.pick_for_sigterm(rng)
            worker = self.fleet.workers[index]
            worker.signal(signal.SIGTERM)
            self.terminating.append((index, worker, now))
            self.figures.sigterms += 1
        elif what == "coord":
            assert self.coordinator is not None
            self.coordinator.signal(signal.SIGKILL)
            self.coordinator.wait(10)
            self.figures.coordinator_kills += 1
            self.start_coordinator(out)
        else:
            assert isinstance(self.redis, LocalRedis)
            self.redis.restart()
            self.figures.redis_restarts += 1

    # -- Redis behind Sentinel ----------------------------------------------------------
    def calm_pair(self, problems: Path, out: Path, max_wall_s: float) -> float:
        """The problems with two coordinators side by side (each exits once all are
        done); the wall time."""
        self.enqueue(problems)
        start = time.monotonic()
        pair = [self.fleet.start_coordinator(out), self.fleet.start_coordinator(out)]
        self.figures.coordinator_starts += 2
        for child in pair:
            code = child.wait(max(1.0, max_wall_s - (time.monotonic() - start)))
            if code != 0:
                raise click.ClickException(f"calm pair ended with {code}; see {self.logs}")
        return time.monotonic() - start

    def failover_chaos(self, problems: Path, out: Path, plan: Plan, rng: random.Random) -> float:
        """Two `--follow` coordinators on one folder while the primary is killed, workers
        are killed and a coordinator is killed; until every id has a row."""
        assert isinstance(self.redis, SentinelGroup)
        ids = self.enqueue(problems)
        index = RowIndex(out / "traces.jsonl", out / "failed.jsonl")
        start = time.monotonic()
        running = [self._follower(out), self._follower(out)]

        def all_written() -> bool:
            index.refresh()
            return all(index.kind(i) is not None for i in ids)

        def fault(what: str, now: float) -> None:
            if what == "coord":  # one of the two, and a new one in its place
                victim = running.pop(rng.randrange(len(running)))
                victim.signal(signal.SIGKILL)
                victim.wait(10)
                self.figures.coordinator_kills += 1
                running.append(self._follower(out))
            elif what == "failover":
                self._failover()
            else:
                self._fault(what, out, rng, now)

        def replace_dead() -> None:  # a coordinator that died unasked is a finding: replaced
            for child in list(running):
                if not child.alive():
                    click.echo(f"a coordinator exited {child.wait(0)} unasked", err=True)
                    running.remove(child)
                    running.append(self._follower(out))

        self._under_faults(plan, rng, start, all_written, fault, replace_dead)
        wall = time.monotonic() - start
        for child in running:  # SIGTERM: each hands back nothing (all done) and exits 0
            child.signal(signal.SIGTERM)
        for child in running:
            if child.wait(60) != 0:
                raise click.ClickException(f"a coordinator did not stop cleanly; see {self.logs}")
        return wall

    def _follower(self, out: Path) -> Child:
        self.figures.coordinator_starts += 1
        return self.fleet.start_coordinator(out, "--follow")

    def _failover(self) -> None:
        """SIGKILL the primary; once the Sentinels promote the replica, start the old
        primary again (it becomes the replica) and wait until it is in sync."""
        assert isinstance(self.redis, SentinelGroup)
        self.redis.wait_ready()  # the previous failover's replica has caught up
        killed_at = time.monotonic()
        old = self.redis.kill_primary()
        self.redis.wait_failover(old)
        self.figures.failover_s.append(round(time.monotonic() - killed_at, 2))
        self.figures.failovers += 1
        self.redis.restart(old)

    def _replace_terminated(self, now: float) -> None:
        for item in list(self.terminating):
            index, worker, since = item
            if not worker.alive():
                assert worker.popen is not None
                self.figures.sigterm_exit_codes.append(worker.popen.returncode)
                self.figures.sigterm_exit_s.append(round(now - since, 2))
                self.terminating.remove(item)
                self.fleet.respawn(index)

    def _kill_a_worker(self, rng: random.Random) -> None:
        busy = {i for i, _, _ in self.terminating}
        index = rng.choice([i for i in range(len(self.fleet.workers)) if i not in busy])
        self.fleet.replace_worker(index, signal.SIGKILL)
        self.figures.worker_kills += 1


@dataclass
class Plan:
    """When each fault comes: SIGTERMs, coordinator kills and Redis restarts spread over
    the first 70% of the expected run, and a worker SIGKILLed every `kill_every_s`."""

    expected_s: float
    kill_every_s: float
    sigterms: int
    coordinator_kills: int
    redis_restarts: int
    max_wall_s: float
    failovers: int = 0

    def faults(self) -> list[tuple[float, str]]:
        plan: list[tuple[float, str]] = []
        for i in range(self.sigterms):
            plan.append((self.expected_s * (0.10 + 0.5 * i / max(1, self.sigterms)), "sigterm"))
        for i in range(self.coordinator_kills):
            at = 0.20 + 0.45 * i / max(1, self.coordinator_kills)
            plan.append((self.expected_s * at, "coord"))
        for i in range(self.redis_restarts):
            at = 0.35 + 0.3 * i / max(1, self.redis_restarts)
            plan.append((self.expected_s * at, "redis"))
        for i in range(self.failovers):
            at = 0.15 + 0.5 * i / max(1, self.failovers)
            plan.append((self.expected_s * at, "failover"))
        return sorted(plan)


def check(ids: list[str], out: Path) -> dict[str, Any]:
    """Every id exactly once across traces and failures, and every row valid: a trace
    row that parses (`rows.TraceRow`) with a user turn and an assistant turn that closes
    its thinking, and steps; a failure row with its reason."""
    invalid: list[str] = []
    traces = read_rows(out / "traces.jsonl", TraceRow, invalid)
    failed = read_rows(out / "failed.jsonl", FailureRow, invalid)
    seen = Counter(r.id for r in [*traces, *failed])
    missing = sorted(set(ids) - set(seen))
    twice = sorted(i for i, n in seen.items() if n > 1)
    unknown = sorted(set(seen) - set(ids))
    for r in traces:
        roles = [m.role for m in r.messages]
        content = r.messages[-1].content if r.messages else ""
        if roles != ["user", "assistant"] or "</think>" not in content or not r.steps:
            invalid.append(r.id)
    invalid += [r.id for r in failed if not r.reason]
    accuracy = summarize(traces, failed).accuracy
    return {
        "traces": len(traces),
        "failed": len(failed),
        "missing": missing,
        "duplicated": twice,
        "unknown": unknown,
        "invalid": invalid,
        "accuracy": None if accuracy is None else round(accuracy, 3),
        "ok": not (missing or twice or unknown or invalid),
        "failure_reasons": sorted({r.reason[:120] for r in failed}),
    }


def log_events(path: Path) -> Counter[str]:
    events: Counter[str] = Counter()
    if not path.exists():
        return events
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events[str(json.loads(line).get("event"))] += 1
            except json.JSONDecodeError:
                continue
    return events


def coordinator_totals(path: Path) -> dict[str, int]:
    totals: Counter[str] = Counter()
    if not path.exists():
        return {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if '"coordinator_finished"' in line:
            try:  # two coordinators append to one log: a line can come torn
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for k in (
                "redispatched",
                "late_results",
                "resumed",
                "redis_outages",
                "lost_leases",
                "reconciled",
                "steps",
            ):
                totals[k] += int(row.get(k, 0))
    return dict(totals)


def chaos_config(
    beam_width: int, thinking_budget: int, redis_url: str | None = None
) -> dict[str, Any]:
    """examples/demo.yaml on a private Redis (a free port, or `redis_url`) and a
    namespace of its own, with lost workers and dead coordinators noticed within seconds."""
    demo = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text(encoding="utf-8"))
    for spec in [*demo["teachers"], demo["meta_prover"]]:
        spec["model"] = str((ROOT / "examples" / spec["model"]).resolve())
    return {
        **demo,
        "redis_url": redis_url or f"redis://127.0.0.1:{free_port()}/0",
        "namespace": f"chaos-{uuid.uuid4().hex[:6]}",
        "reliability": {
            "task_timeout_s": 120,
            "max_attempts": 5,
            "heartbeat_s": 1.0,
            "worker_lost_s": 4.0,
            "lease_s": 6.0,
            "shutdown_grace_s": 5.0,
        },
        "search": {**demo["search"], "beam_width": beam_width, "thinking_budget": thinking_budget},
    }


def report_of(
    chaos: Chaos, result: dict[str, Any], calm_s: float | None, chaos_s: float
) -> dict[str, Any]:
    """The run's figures: the faults done, and what every coordinator's and worker's
    log says came of them."""
    figures = chaos.figures
    coordinator_log = chaos.logs / "coordinator.log"
    totals = coordinator_totals(coordinator_log)
    coordinator_events = log_events(coordinator_log)
    worker_events: Counter[str] = Counter()
    for log in chaos.logs.glob("*.log"):
        if log != coordinator_log:
            worker_events += log_events(log)
    result["ok"] = result["ok"] and all(c == 0 for c in figures.sigterm_exit_codes)
    return {
        "workers": len(chaos.fleet.cfg.model_names) * chaos.fleet.workers_per_pool,
        "calm_wall_s": round(calm_s, 1) if calm_s else None,
        "chaos_wall_s": round(chaos_s, 1),
        "wall_ratio": round(chaos_s / calm_s, 2) if calm_s else None,
        **figures.__dict__,
        # From every coordinator's log (killed ones included)...
        "tasks_redispatched": coordinator_events.get("redispatch", 0),
        "redis_outages_seen": coordinator_events.get("redis_lost", 0)
        + coordinator_events.get("redis_unreachable", 0),
        "leases_lost": coordinator_events.get("lease_lost", 0),
        # ...and from the summaries of the coordinators that finished.
        "late_results_ignored": totals.get("late_results", 0),
        "problems_resumed": totals.get("resumed", 0),
        "rows_reconciled": totals.get("reconciled", 0),
        "server_changes_seen": coordinator_events.get("redis_server_changed", 0),
        "tasks_handed_back": worker_events.get("task_handed_back", 0),
        "check": result,
    }


def print_report(report: dict[str, Any]) -> None:
    """Every figure, then the ``name=value`` lines scripts read, ``chaos_ok`` last."""
    check_ = report["check"]
    for k, v in report.items():
        if k != "check":
            click.echo(f"{k:>22}: {v}")
    for k, v in check_.items():
        click.echo(f"{'check.' + k:>22}: {v}")
    for k in ("worker_kills", "coordinator_kills", "redis_restarts", "sigterms", "failovers"):
        click.echo(f"chaos_{k}={report[k]}")
    for k in ("calm_steps_per_s_one", "calm_steps_per_s_two"):
        if report.get(k) is not None:
            click.echo(f"chaos_{k}={report[k]}")
    click.echo(f"chaos_lost={len(check_['missing'])}")
    click.echo(f"chaos_duplicated={len(check_['duplicated'])}")
    click.echo(f"chaos_tasks_redispatched={report['tasks_redispatched']}")
    if report["wall_ratio"] is not None:
        click.echo(f"chaos_wall_ratio={report['wall_ratio']}")
    click.echo(f"chaos_ok={int(check_['ok'])}")


@click.command()
@click.option(
    "--problems",
    "source",
    default="100",
    show_default=True,
    help="How many lab problems to make, or a problems JSONL file (as cord-coord enqueue "
    "reads it); the lab's tiny models answer either.",
)
@click.option("--workers-per-model", default=2, show_default=True)
@click.option("--kill-every", "kill_every_s", default=8.0, show_default=True)
@click.option("--sigterms", default=1, show_default=True)
@click.option("--coordinator-kills", default=2, show_default=True)
@click.option("--redis-restarts", default=1, show_default=True, help="Not with --redis-failover.")
@click.option(
    "--redis-failover",
    is_flag=True,
    help="Redis as a primary, a replica and three Sentinels; two coordinators.",
)
@click.option("--failovers", default=2, show_default=True, help="With --redis-failover.")
@click.option("--beam-width", default=4, show_default=True)
@click.option("--thinking-budget", default=400, show_default=True)
@click.option("--calm/--no-calm", default=True, help="Time a calm run first.")
@click.option("--expected-s", default=120.0, help="The run's length when there is no calm run.")
@click.option("--max-wall-s", default=3600.0, show_default=True)
@click.option("--seed", default=2026, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def main(  # a click command: one parameter per option
    source: str,
    workers_per_model: int,
    kill_every_s: float,
    sigterms: int,
    coordinator_kills: int,
    redis_restarts: int,
    redis_failover: bool,
    failovers: int,
    beam_width: int,
    thinking_budget: int,
    calm: bool,
    expected_s: float,
    max_wall_s: float,
    seed: int,
    workdir: Path | None,
    as_json: bool,
) -> None:
    workdir = workdir or ROOT / ".run" / f"chaos-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True, exist_ok=True)
    path = problems_file(source, seed, workdir)
    rng = random.Random(seed)
    ports: tuple[int, int] | None = None
    url = None
    if redis_failover:
        ports = (free_port(), free_port())
        hosts = ",".join(f"127.0.0.1:{free_port()}" for _ in range(3))
        url = f"redis+sentinel://{hosts}/chaos/0"
        redis_restarts = 0
    config = chaos_config(beam_width, thinking_budget, url)
    chaos = Chaos(workdir, config, workers_per_model, ports)
    log = chaos.logs / "coordinator.log"
    figures: dict[str, Any] = {}
    try:
        chaos.start()
        calm_s = calm_check = None
        if calm:
            before = coordinator_totals(log).get("steps", 0)
            calm_s = chaos.calm(path, workdir / "calm", max_wall_s)
            calm_check = check(chaos.enqueued, workdir / "calm")
            steps = coordinator_totals(log).get("steps", 0) - before
            figures["calm_steps_per_s_one"] = round(steps / calm_s, 2)
            if redis_failover:  # what a standby beside it does to the pace
                before += steps
                pair_s = chaos.calm_pair(path, workdir / "calm-two", max_wall_s)
                steps = coordinator_totals(log).get("steps", 0) - before
                figures["calm_two_wall_s"] = round(pair_s, 1)
                figures["calm_steps_per_s_two"] = round(steps / pair_s, 2)
        plan = Plan(
            calm_s or expected_s, kill_every_s, sigterms, coordinator_kills, redis_restarts,
            max_wall_s, failovers if redis_failover else 0,
        )  # fmt: skip
        if redis_failover:
            chaos_s = chaos.failover_chaos(path, workdir / "chaos", plan, rng)
        else:
            chaos_s = chaos.chaos(path, workdir / "chaos", plan, rng)
    finally:
        chaos.stop()
    report = {
        "problems": len(chaos.enqueued),
        "redis": "sentinel" if redis_failover else "one server (AOF)",
        **report_of(chaos, check(chaos.enqueued, workdir / "chaos"), calm_s, chaos_s),
        **figures,
        "calm_accuracy": calm_check["accuracy"] if calm_check else None,
        "workdir": str(workdir),
    }
    if as_json:
        click.echo(json.dumps(report))
    else:
        print_report(report)
    sys.exit(0 if report["check"]["ok"] else 1)


def problems_file(source: str, seed: int, workdir: Path) -> Path:
    """`source` as a problems file: a count makes that many lab problems in `workdir`."""
    if not source.isdigit():
        path = Path(source)
        if not path.is_file():
            raise click.BadParameter(
                f"{source!r} is neither a count nor a problems file", param_hint="--problems"
            )
        return path
    path = workdir / "problems.jsonl"
    problems = make_problems(int(source), seed=seed)
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in problems), encoding="utf-8")
    return path


if __name__ == "__main__":
    main()
