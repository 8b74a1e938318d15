"""Chaos run: the fleet on the lab models while its parts are killed, then a check that
every problem came out exactly once.

    python ops/chaos.py                      # make chaos: 100 problems, 2 workers per model
    python ops/chaos.py --problems 12 --workers-per-model 1 --no-calm --json   # CI's short one

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
Then: every id exactly once across traces and failures, rows valid, and the figures.
The last line is ``chaos_ok=1`` (or 0), for scripts. Exit status 1 when a check fails.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import redis
import yaml

from cord.coordinator.redis_server import start_redis
from cord.coordinator.rows import FailureRow, TraceRow, summarize
from cord.coordinator.rundir import read_rows
from cord.lab.arith import make_problems

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            os.killpg(self.popen.pid, sig)

    def wait(self, timeout: float) -> int | None:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class Figures:
    worker_kills: int = 0
    sigterms: int = 0
    sigterm_exit_codes: list[int | None] = field(default_factory=list)
    sigterm_exit_s: list[float] = field(default_factory=list)
    coordinator_kills: int = 0
    redis_restarts: int = 0
    coordinator_starts: int = 0


class Chaos:
    def __init__(self, workdir: Path, config: dict[str, Any], workers_per_model: int) -> None:
        self.dir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cfg = config
        self.config_path = workdir / "chaos.yaml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.url = config["redis_url"]
        self.redis_dir = workdir / "redis"
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis.from_url(self.url)
        models = [t["name"] for t in config["teachers"]]
        if config["meta_prover"]["name"] not in models:
            models.append(config["meta_prover"]["name"])
        self.workers: list[Proc] = []
        self.generation = Counter[str]()
        for model in models:
            for slot in range(workers_per_model):
                self.workers.append(self._worker(model, slot))
        self.coordinator: Proc | None = None
        self.figures = Figures()

    # -- parts ------------------------------------------------------------------------
    def _worker(self, model: str, slot: int) -> Proc:
        name = f"{model}-{slot}"
        self.generation[name] += 1
        node = f"{name}-g{self.generation[name]}@chaos"
        args = [sys.executable, "-m", "cord.workers.cli", "--config", str(self.config_path)]
        args += ["--teacher", model, "--name", node]
        return Proc(name, args, self.logs / f"{name}.log")

    def start_redis(self) -> None:
        self.redis_proc = start_redis(self.url, self.redis_dir, appendonly=True)

    def restart_redis(self) -> None:
        assert self.redis_proc is not None
        self.redis_proc.terminate()  # SIGTERM: Redis flushes its AOF and exits
        self.redis_proc.wait(30)
        time.sleep(1.0)
        self.start_redis()
        self.figures.redis_restarts += 1

    def start_workers(self) -> None:
        for w in self.workers:
            w.start()
        want = len(self.workers)
        deadline = time.monotonic() + 300
        while self.client.hlen(f"{self.cfg['namespace']}:workers") < want:
            if time.monotonic() > deadline:
                raise click.ClickException(f"workers not ready; logs in {self.logs}")
            time.sleep(0.3)

    def replace_worker(self, index: int) -> None:
        old = self.workers[index]
        model, slot = old.name.rsplit("-", 1)
        new = self._worker(model, int(slot))
        new.start()
        self.workers[index] = new

    def node(self, proc: Proc) -> str:
        return proc.args[proc.args.index("--name") + 1]

    def pick_for_sigterm(self, rng: random.Random) -> int:
        """A worker in the middle of a task if there is one (the case that matters),
        else one that serves; a spot notice can also hit a loading worker, but that is
        the easy case."""
        ns = self.cfg["namespace"]
        running = {v.decode() for v in self.client.hvals(f"{ns}:running")}
        serving = {k.decode() for k in self.client.hkeys(f"{ns}:workers")}
        for pool in (running, serving):
            found = [i for i, w in enumerate(self.workers) if self.node(w) in pool and w.alive()]
            if found:
                return rng.choice(found)
        return rng.randrange(len(self.workers))

    def start_coordinator(self, out: Path) -> None:
        self.figures.coordinator_starts += 1
        args = [sys.executable, "-m", "cord.coordinator.cli", "run", "--config"]
        args += [str(self.config_path), "--out", str(out), "--no-progress"]
        self.coordinator = Proc("coordinator", args, self.logs / "coordinator.log")
        self.coordinator.start()

    def enqueue(self, problems: Path) -> None:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "cord.coordinator.cli",
                "enqueue",
                "--config",
                str(self.config_path),
                str(problems),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def reset_state(self) -> None:
        """Forget the problems (not the workers), so the same ids run again."""
        ns = self.cfg["namespace"]
        for suffix in ("problems", "queue", "inflight", "state", "done", "failed", "running"):
            self.client.delete(f"{ns}:{suffix}")
        for key in self.client.scan_iter(match=f"{ns}:replies:*"):
            self.client.delete(key)

    def stop(self) -> None:
        for p in [*self.workers, *([self.coordinator] if self.coordinator else [])]:
            p.signal(signal.SIGKILL)
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.terminate()
            self.redis_proc.wait(30)

    # -- runs -------------------------------------------------------------------------
    def calm(self, problems: Path, out: Path, max_wall_s: float) -> float:
        self.reset_state()
        self.enqueue(problems)
        start = time.monotonic()
        self.start_coordinator(out)
        assert self.coordinator is not None
        code = self.coordinator.wait(max_wall_s)
        if code != 0:
            raise click.ClickException(f"calm run ended with {code}; see {self.logs}")
        return time.monotonic() - start

    def chaos(
        self,
        problems: Path,
        out: Path,
        expected_s: float,
        kill_every_s: float,
        sigterms: int,
        coordinator_kills: int,
        redis_restarts: int,
        max_wall_s: float,
        rng: random.Random,
    ) -> float:
        self.reset_state()
        self.enqueue(problems)
        # Faults spread over the first 70% of the calm run's length.
        plan: list[tuple[float, str]] = []
        for i in range(sigterms):
            plan.append((expected_s * (0.10 + 0.5 * i / max(1, sigterms)), "sigterm"))
        for i in range(coordinator_kills):
            plan.append((expected_s * (0.20 + 0.45 * i / max(1, coordinator_kills)), "coord"))
        for i in range(redis_restarts):
            plan.append((expected_s * (0.35 + 0.3 * i / max(1, redis_restarts)), "redis"))
        plan.sort()
        start = time.monotonic()
        self.start_coordinator(out)
        next_kill = start + kill_every_s
        terminating: list[tuple[int, Proc, float]] = []
        while True:
            now = time.monotonic()
            assert self.coordinator is not None
            code = self.coordinator.popen.poll() if self.coordinator.popen else None
            if code == 0:
                break
            if code is not None:  # died on its own: that is a finding, but carry on
                click.echo(f"coordinator exited {code} unasked; starting it again", err=True)
                self.start_coordinator(out)
            if now - start > max_wall_s:
                raise click.ClickException(f"chaos run passed {max_wall_s:.0f}s; see {self.logs}")
            while plan and now - start >= plan[0][0]:
                _, what = plan.pop(0)
                if what == "sigterm":
                    index = self.pick_for_sigterm(rng)
                    proc = self.workers[index]
                    proc.signal(signal.SIGTERM)
                    terminating.append((index, proc, now))
                    self.figures.sigterms += 1
                elif what == "coord":
                    self.coordinator.signal(signal.SIGKILL)
                    self.coordinator.wait(10)
                    self.figures.coordinator_kills += 1
                    self.start_coordinator(out)
                else:
                    self.restart_redis()
            for item in list(terminating):
                index, proc, since = item
                if not proc.alive():
                    self.figures.sigterm_exit_codes.append(proc.popen.returncode)  # type: ignore[union-attr]
                    self.figures.sigterm_exit_s.append(round(now - since, 2))
                    terminating.remove(item)
                    self.replace_worker(index)
            if now >= next_kill:
                busy = {i for i, _, _ in terminating}
                choices = [i for i in range(len(self.workers)) if i not in busy]
                index = rng.choice(choices)
                self.workers[index].signal(signal.SIGKILL)
                self.workers[index].wait(10)
                self.figures.worker_kills += 1
                self.replace_worker(index)
                next_kill = now + kill_every_s
            time.sleep(0.2)
        return time.monotonic() - start


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
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if '"coordinator_finished"' in line:
            row = json.loads(line)
            for k in ("redispatched", "duplicates", "resumed", "redis_outages", "lost_leases"):
                totals[k] += int(row.get(k, 0))
    return dict(totals)


@click.command()
@click.option("--problems", "n", default=100, show_default=True)
@click.option("--workers-per-model", default=2, show_default=True)
@click.option("--kill-every", "kill_every_s", default=8.0, show_default=True)
@click.option("--sigterms", default=1, show_default=True)
@click.option("--coordinator-kills", default=2, show_default=True)
@click.option("--redis-restarts", default=1, show_default=True)
@click.option("--beam-width", default=4, show_default=True)
@click.option("--thinking-budget", default=400, show_default=True)
@click.option("--calm/--no-calm", default=True, help="Time a calm run first.")
@click.option("--expected-s", default=120.0, help="The run's length when there is no calm run.")
@click.option("--max-wall-s", default=3600.0, show_default=True)
@click.option("--seed", default=2026, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def main(
    n: int,
    workers_per_model: int,
    kill_every_s: float,
    sigterms: int,
    coordinator_kills: int,
    redis_restarts: int,
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
    demo = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text(encoding="utf-8"))
    for spec in [*demo["teachers"], demo["meta_prover"]]:
        spec["model"] = str((ROOT / "examples" / spec["model"]).resolve())
    config = {
        **demo,
        "redis_url": f"redis://127.0.0.1:{free_port()}/0",
        "namespace": f"chaos-{uuid.uuid4().hex[:6]}",
        "reliability": {
            "task_timeout_s": 120,
            "max_attempts": 5,
            "heartbeat_s": 1.0,
            "worker_lost_s": 4.0,
            "lease_s": 6.0,
            "shutdown_grace_s": 5.0,
        },
    }
    config["search"] = {
        **demo["search"],
        "beam_width": beam_width,
        "thinking_budget": thinking_budget,
    }
    problems = make_problems(n, seed=seed)
    path = workdir / "problems.jsonl"
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in problems), encoding="utf-8")
    ids = [p.id for p in problems]
    rng = random.Random(seed)
    chaos = Chaos(workdir, config, workers_per_model)
    try:
        chaos.start_redis()
        chaos.start_workers()
        calm_s = chaos.calm(path, workdir / "calm", max_wall_s) if calm else None
        calm_check = check(ids, workdir / "calm") if calm else None
        chaos_s = chaos.chaos(
            path,
            workdir / "chaos",
            calm_s or expected_s,
            kill_every_s,
            sigterms,
            coordinator_kills,
            redis_restarts,
            max_wall_s,
            rng,
        )
    finally:
        chaos.stop()
    result = check(ids, workdir / "chaos")
    figures = chaos.figures
    totals = coordinator_totals(chaos.logs / "coordinator.log")
    coordinator_events = log_events(chaos.logs / "coordinator.log")
    worker_events: Counter[str] = Counter()
    for log in chaos.logs.glob("*.log"):
        if log.name != "coordinator.log":
            worker_events += log_events(log)
    result["ok"] = result["ok"] and all(c == 0 for c in figures.sigterm_exit_codes)
    report = {
        "problems": n,
        "workers": len(chaos.workers),
        "calm_wall_s": round(calm_s, 1) if calm_s else None,
        "chaos_wall_s": round(chaos_s, 1),
        "wall_ratio": round(chaos_s / calm_s, 2) if calm_s else None,
        "calm_accuracy": calm_check["accuracy"] if calm_check else None,
        **figures.__dict__,
        # From every coordinator's log (killed ones included)...
        "tasks_redispatched": coordinator_events.get("redispatch", 0),
        "redis_outages_seen": coordinator_events.get("redis_lost", 0)
        + coordinator_events.get("redis_unreachable", 0),
        "leases_lost": coordinator_events.get("lease_lost", 0),
        # ...and from the summaries of the coordinators that finished.
        "duplicates_ignored": totals.get("duplicates", 0),
        "problems_resumed": totals.get("resumed", 0),
        "tasks_handed_back": worker_events.get("task_handed_back", 0),
        "check": result,
        "workdir": str(workdir),
    }
    if as_json:
        click.echo(json.dumps(report))
    else:
        for k, v in report.items():
            if k != "check":
                click.echo(f"{k:>22}: {v}")
        for k, v in result.items():
            click.echo(f"{'check.' + k:>22}: {v}")
        for k in ("worker_kills", "coordinator_kills", "redis_restarts", "sigterms"):
            click.echo(f"chaos_{k}={report[k]}")
        click.echo(f"chaos_tasks_redispatched={report['tasks_redispatched']}")
        if report["wall_ratio"] is not None:
            click.echo(f"chaos_wall_ratio={report['wall_ratio']}")
        click.echo(f"chaos_ok={int(result['ok'])}")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
