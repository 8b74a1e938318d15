"""What every fleet benchmark shares: the machine it runs on, the configs and problems,
a fleet of real workers (`BenchFleet`, a `LocalFleet` whose workers may load the `bench`
engine), the coordinator run and timed in this process (`run_fleet`, `StepTimer`), and
the figures' helpers. `fleet.py`, `servers.py` and `backlog.py` are the benchmarks.

Rows: every run writes its rows to a temporary folder that is deleted at the end. Rows of
the `bench` engine are placeholders and never leave a benchmark; the run config refuses
that engine everywhere else (`cord.common.config.allow_bench_engine`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import redis
import yaml

from cord.common import env
from cord.common.config import RunConfig, config_from_dict
from cord.common.keys import Keys
from cord.common.messages import EngineStats, Heartbeat, TaskResult
from cord.coordinator.driver import Coordinator, Observer
from cord.coordinator.fleet import LocalFleet, wipe_namespace
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.redis_server import LocalRedis
from cord.coordinator.rows import TraceRow, summarize
from cord.coordinator.rundir import read_failures, read_traces
from cord.coordinator.search import Work, WorkKey
from cord.coordinator.store import Store
from cord.lab.arith import make_problems

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEMO_CONFIG = ROOT / "examples" / "demo.yaml"
# Seeds of the problem sets: none of them is a training, evaluation or demo seed.
SEED = 4242
WARMUP_SEED = 4243
# A vLLM CPU server per pool, as examples/vllm.yaml sets it up (blocks of 32 tokens: the
# CPU build's 128 would cache none of the lab's short prompts).
VLLM_CPU: dict[str, Any] = {
    "max_model_len": 1024,
    "vllm_args": ["--block-size", "32"],
    "startup_timeout_s": 900,
}
# The only command that may start a worker on the `bench` engine (`fleet.py worker`).
BENCH_WORKER = (sys.executable, str(HERE / "fleet.py"), "worker")


# -- the machine -----------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """Cores, CPU model, load average and versions: every report states its machine."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "load_avg_1_5_15": [round(x, 2) for x in load],
        "python": platform.python_version(),
        "host": platform.node(),
    }
    # Not imported: the coordinator's memory is measured in this process.
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["torch"] = importlib.metadata.version("torch")
    return info


def gpu_name() -> str | None:
    """The first CUDA device, for runs that load torch anyway."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def rss_mib(pid: int | str = "self") -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB, from /proc (Linux)."""
    now = peak = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            now = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    return now, peak


def run_watched(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str, float, float]:
    """Run `cmd` to its end: (exit status, its output, wall seconds, its peak RSS MiB).

    The peak is the child's VmHWM, read every 20 ms while it runs: it starts afresh at
    exec. `wait4`'s ru_maxrss would carry over the RSS the child had between fork and
    exec, which is its parent's (579 MiB where a test process had loaded the models)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = 0.0
        while proc.poll() is None:
            with contextlib.suppress(OSError):  # it may exit between poll and read
                peak = max(peak, rss_mib(proc.pid)[1])
            time.sleep(0.02)
        wall = time.perf_counter() - start
        out.seek(0)
        return proc.returncode, out.read().decode(errors="replace"), wall, peak


# -- configs and problems --------------------------------------------------------------
def lab_problems(n: int, seed: int) -> list[Problem]:
    return [Problem.model_validate(p.to_json()) for p in make_problems(n, seed)]


def synthetic_problems(n: int, tag: str) -> list[Problem]:
    """Problems for the bench engine (it never reads them): ids and a reference answer."""
    return [
        Problem(id=f"{tag}-{i}", question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(n)
    ]


def demo_dict() -> dict[str, Any]:
    """examples/demo.yaml with its model paths made absolute."""
    data = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    for entry in [*data["teachers"], data["meta_prover"]]:
        entry["model"] = str((DEMO_CONFIG.parent / entry["model"]).resolve())
    return dict(data)


def fleet_dict(
    redis_url: str,
    namespace: str,
    *,
    engine: str = "hf",
    bench_steps: int = 4,
    bench_ms: int = 0,
    model: str | None = None,
    device: str = "cpu",
    cpu_threads: int = 1,
    max_in_flight: int | None = None,
    affinity: bool | None = None,
) -> dict[str, Any]:
    """The demo's settings on `engine`: the lab models (hf) or placeholders (bench)."""
    data = demo_dict()
    data.update(redis_url=redis_url, namespace=namespace)
    data.pop("output", None)
    for entry in [*data["teachers"], data["meta_prover"]]:
        entry["engine"] = engine
        if engine == "bench":
            entry["model"] = f"steps={bench_steps},ms={bench_ms}"
        else:
            if model is not None:
                entry["model"] = model
            entry["device"] = device
            if engine == "hf":
                entry["cpu_threads"] = cpu_threads
            elif engine == "vllm":
                entry.update(VLLM_CPU)
    if max_in_flight is not None:
        data["max_in_flight"] = max_in_flight
    # A loaded 2-core machine can starve a worker's heartbeat: don't call it lost.
    # Heartbeats every second: a run's engine counters are read from a fresh one.
    data.setdefault("reliability", {}).update(heartbeat_s=1.0, worker_lost_s=60.0)
    if affinity is not None:
        data["routing"] = {"affinity": affinity}
    return data


# -- the fleet ---------------------------------------------------------------------------
def default_redis_url() -> str:
    return env.redis_url() or env.DEFAULT_REDIS_URL


@contextmanager
def redis_at(url: str, workdir: Path) -> Iterator[str]:
    """The Redis at `url` if it answers; otherwise one started here (no AOF: nothing of
    a benchmark needs to survive), stopped afterwards."""
    server = LocalRedis(url, workdir / "redis", appendonly=False)
    if not server.ensure():
        click.echo(f"no Redis answered at {url}; started one", err=True)
    try:
        yield url
    finally:
        server.stop()


class BenchFleet(LocalFleet):
    """Real `cord-worker` processes (``workers_per_pool`` per pool) for the config `data`,
    started through `BENCH_WORKER`, on the Redis `redis_at` keeps; `stop` also drops the
    fleet's namespace. It measures its workers: their CPU time (their servers' included)
    and their engines' counters (from their heartbeats)."""

    def __init__(self, data: dict[str, Any], workdir: Path, workers_per_pool: int = 1) -> None:
        path = workdir / f"{data['namespace']}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        cfg = config_from_dict(data, source=str(path))
        super().__init__(
            path,
            workdir,
            cfg=cfg,
            workers_per_pool=workers_per_pool,
            tag="bench",
            worker_command=BENCH_WORKER,
            local_redis=LocalRedis(cfg.redis_url, workdir / "redis", appendonly=False),
        )

    def stop(self, wipe: bool = True, grace_s: float = 20.0) -> None:
        super().stop(wipe=wipe, grace_s=grace_s)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) each worker has used so far, by slot, its live
        child processes included (a server engine's server)."""
        stats = _proc_stats()
        return {w.name: _tree_cpu_s(w.pid, stats) for w in self.workers}

    def engine_stats(self) -> dict[str, EngineStats]:
        """The workers' engine counters from their last heartbeats, by worker name."""
        raw = self.client.hgetall(self.keys.workers)
        return {k.decode(): Heartbeat.model_validate_json(v).engine for k, v in raw.items()}

    def engine_delta(self, before: dict[str, EngineStats]) -> dict[str, EngineStats]:
        """Each worker's engine counters since `before`, from heartbeats written after
        now (the last ones may predate the end of a run)."""
        time.sleep(self.cfg.reliability.heartbeat_s + 0.2)
        return {
            name: after.since(before.get(name, EngineStats()))
            for name, after in self.engine_stats().items()
        }


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds so far) of every process, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def descendants(root: int, stats: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """The processes below `root` (not `root` itself), by /proc (or `stats`)."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (parent, _) in (stats if stats is not None else _proc_stats()).items():
        children[parent].append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _tree_cpu_s(root: int, stats: dict[int, tuple[int, float]]) -> float:
    return sum(stats.get(pid, (0, 0.0))[1] for pid in [root, *descendants(root, stats)])


def exact_cpu_s(pids: list[int]) -> float:
    """CPU seconds every thread of `pids` has run, to the nanosecond (the scheduler's own
    count in /proc/PID/task/TID/schedstat; /proc's stat counts 10 ms ticks)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


# -- the coordinator, timed ------------------------------------------------------------
def _step_label(works: list[Work]) -> str | None:
    """The phase a batch of new work opens for a problem: ``x<step>`` (a CoRD step's
    expansions), ``a`` (final answers only), ``w`` (curation's whole trajectories).
    Scoring work opens nothing: it belongs to the step whose candidates it scores."""
    labels = set()
    for w in works:
        if w.key.kind == "x":
            labels.add(f"x{w.key.parts[0]}")
        elif w.key.kind in ("a", "w"):
            labels.add(w.key.kind)
    xs = sorted((lab for lab in labels if lab.startswith("x")), key=lambda s: int(s[1:]))
    if xs:
        return xs[-1]
    return "a" if "a" in labels else ("w" if "w" in labels else None)


class StepTimer(Observer):
    """A stopwatch per problem step, watching the driver's loop: a step's latency is the
    time from queueing its expansions to queueing the next step's (or the final
    answers): dispatch, generation, scoring, selection and the commit of its state.

    It also times the wait for selection: a phase (a CoRD step, curation's whole
    trajectories) ends when its last result is in; every result that came before waited
    from its arrival to then. `wait_s` sums those waits, `phase_s` the same results' time
    from the phase's start to its end, so `wait_s / phase_s` is the share of a phase that
    finished work spent waiting for the rest of its step.

    And the tail of a CoRD step: a candidate is done at its last result (its score, or
    its expansion where a twin's score answers for it). Over the steps with two
    candidates or more, `tail_s` sums the time from the next-to-last candidate's end to
    the last one's (what selecting without the slowest candidate would save the step),
    `span_s` the time from the step's start to its last candidate's end, and
    `slowest_over_mean` holds each step's slowest candidate's time over its candidates'
    mean time, both from the step's start."""

    def __init__(self, max_in_flight: int) -> None:
        self.coordinator: Coordinator | None = None
        self.max_in_flight = max_in_flight
        self._open: dict[str, tuple[str, float]] = {}
        self._arrived: dict[str, list[float]] = defaultdict(list)  # results of an open phase
        self._done: dict[str, dict[tuple[str | int, ...], float]] = defaultdict(dict)
        self.tail_s = 0.0
        self.span_s = 0.0
        self.slowest_over_mean: list[float] = []
        self.step_latencies: list[float] = []
        self.steps = 0
        self.wait_s = 0.0
        self.phase_s = 0.0
        self.peak_in_flight = 0
        self.rss_at_peak_mib = 0.0
        self.round_trip_s = 0.0  # replies: from sending a task to its (partial) reply
        self.engine_s = 0.0  # the same replies' time inside the workers' engines
        self.partial_replies = 0

    def replied(self, result: TaskResult, round_trip_s: float) -> None:
        self.round_trip_s += round_trip_s
        self.engine_s += min(result.elapsed_s, round_trip_s)
        self.partial_replies += result.partial

    def served(self, pid: str, model: str, worker: str, key: WorkKey) -> None:
        opened = self._open.get(pid)
        if opened is not None:
            now = time.perf_counter()
            self._arrived[pid].append(now)
            if key.kind in ("x", "s") and opened[0] == f"x{key.parts[0]}":
                self._done[pid][key.parts] = now

    def _step_tail(self, pid: str, start: float) -> None:
        ends = sorted(self._done.pop(pid, {}).values())
        if len(ends) >= 2:
            self.tail_s += ends[-1] - ends[-2]
            self.span_s += ends[-1] - start
            mean = sum(ends) / len(ends) - start
            if mean > 0:
                self.slowest_over_mean.append((ends[-1] - start) / mean)

    def queued(self, pid: str, works: list[Work]) -> None:
        label = _step_label(works)
        if label is not None:
            now = time.perf_counter()
            opened = self._open.get(pid)
            if opened is not None and opened[0] != label:
                for t in self._arrived.pop(pid, []):
                    self.wait_s += now - t
                    self.phase_s += now - opened[1]
            if opened is not None and opened[0] != label and opened[0].startswith("x"):
                self.step_latencies.append(now - opened[1])
                self.steps += 1
                self._step_tail(pid, opened[1])
            if label == "a":
                self._open.pop(pid, None)  # its last phase: nothing more to time
            elif opened is None or opened[0] != label:
                self._open[pid] = (label, now)
        in_flight = len(self.coordinator.searches) if self.coordinator else 0
        if in_flight > self.peak_in_flight:
            self.peak_in_flight = in_flight
            if in_flight % 1000 == 0 or in_flight == self.max_in_flight:
                self.rss_at_peak_mib = rss_mib()[0]


@dataclass
class FleetRun:
    wall_s: float
    rows: list[TraceRow]
    failed: int
    summary: dict[str, Any]
    step_latencies: list[float] = field(default_factory=list)
    steps: int = 0
    peak_in_flight: int = 0
    rss_at_peak_mib: float = 0.0
    coordinator_cpu_s: float = 0.0
    worker_cpu_s: dict[str, float] = field(default_factory=dict)
    wait_s: float = 0.0  # `StepTimer`: results waiting for their step's selection
    phase_s: float = 0.0
    engine: dict[str, EngineStats] = field(default_factory=dict)  # by worker, over the run
    finished_s: list[float] = field(default_factory=list)  # each problem's end, from start
    round_trip_s: float = 0.0  # `StepTimer`: replies' round trips, and their engine time
    engine_s: float = 0.0
    partial_replies: int = 0  # replies that carried part of a task (streamed)
    tail_s: float = 0.0  # `StepTimer`: CoRD steps' wait on their slowest candidate
    span_s: float = 0.0
    slowest_over_mean: list[float] = field(default_factory=list)

    @property
    def step_tail_share(self) -> float | None:
        """Of CoRD's step time, the share spent waiting on each step's slowest candidate
        once all the others were done."""
        return self.tail_s / self.span_s if self.span_s else None

    @property
    def fleet_overhead_share(self) -> float | None:
        """Of the time from sending a task to its replies, the share outside the
        workers' engines: queues, Celery, Redis, the coordinator's loop."""
        return 1 - self.engine_s / self.round_trip_s if self.round_trip_s else None

    @property
    def selection_wait_share(self) -> float | None:
        return self.wait_s / self.phase_s if self.phase_s else None

    @property
    def cpu_s(self) -> float:
        return self.coordinator_cpu_s + sum(self.worker_cpu_s.values())

    def cpu_line(self) -> str:
        """Where the CPU went: the coordinator (this process) and each worker."""
        parts = [f"coordinator {self.coordinator_cpu_s:.1f}"]
        parts += [f"{k} {v:.1f}" for k, v in self.worker_cpu_s.items()]
        busy = self.coordinator_cpu_s + sum(self.worker_cpu_s.values())
        return f"cpu s: {', '.join(parts)}; {busy:.1f} in {self.wall_s:.1f}s wall"


def process_cpu_s() -> float:
    """CPU seconds of this process, all threads."""
    t = os.times()
    return t.user + t.system


def run_fleet(
    cfg: RunConfig,
    problems: list[Problem],
    strategy: str | None = None,
    fleet: BenchFleet | None = None,
    on_finished: Callable[[int, float], None] | None = None,
) -> FleetRun:
    """`problems` through the live fleet, timed by a `StepTimer`, in a problem-state
    namespace of their own (as `cord-coord eval` does); rows to a temporary folder.
    With `fleet`, the CPU time of its workers (their servers included) during the run is
    recorded too, and their engines' counters over the run (`engine`: read from the
    workers' heartbeats, once a fresh one has come after the run). `on_finished` is
    called with the count of problems finished and the seconds since the start, at each
    problem's end (in the coordinator's loop: keep it short)."""
    if strategy is not None:
        cfg = cfg.model_copy(
            update={"search": cfg.search.model_copy(update={"strategy": strategy})}
        )
    state_ns = f"{cfg.namespace}:run:{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as out:
        timer = StepTimer(cfg.max_in_flight)
        finished: list[float] = []
        start = time.perf_counter()

        def on_event(kind: str, pid: str) -> None:
            finished.append(time.perf_counter() - start)
            if on_finished is not None:
                on_finished(len(finished), finished[-1])

        coord = Coordinator(cfg, out, state_namespace=state_ns, observer=timer, on_event=on_event)
        timer.coordinator = coord
        try:
            Store(coord.redis, Keys(state_ns)).enqueue(problems)
            workers_before = fleet.cpu_s() if fleet else {}
            engine_before = fleet.engine_stats() if fleet else {}
            cpu_before = process_cpu_s()
            start = time.perf_counter()
            summary = coord.run()
            wall = time.perf_counter() - start
            coordinator_cpu = process_cpu_s() - cpu_before
            workers_after = fleet.cpu_s() if fleet else {}
            engine = fleet.engine_delta(engine_before) if fleet else {}
            rows = read_traces(coord.writer.traces)
            failed = len(read_failures(coord.writer.failed))
        finally:
            wipe_namespace(coord.redis, Keys(state_ns))
    return FleetRun(
        wall,
        rows,
        failed,
        summary,
        timer.step_latencies,
        timer.steps,
        timer.peak_in_flight,
        timer.rss_at_peak_mib,
        coordinator_cpu,
        {k: round(v - workers_before.get(k, 0.0), 2) for k, v in workers_after.items()},
        timer.wait_s,
        timer.phase_s,
        engine,
        finished,
        timer.round_trip_s,
        timer.engine_s,
        timer.partial_replies,
        timer.tail_s,
        timer.span_s,
        timer.slowest_over_mean,
    )


class RedisSampler:
    """Redis ``used_memory`` every half second in a thread; keeps the peak."""

    def __init__(self, client: redis.Redis) -> None:

        self.client = client
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, int(self.client.info("memory")["used_memory"]))
            self._stop.wait(0.5)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


# -- figures ------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def tokens_of(rows: list[TraceRow]) -> float:
    """Mean generated tokens per problem (all teachers, kept and discarded, answers)."""
    return summarize(rows).mean_generated_tokens or 0.0


def cache_share(rows: list[TraceRow]) -> float | None:
    share = summarize(rows).cache_hit_share
    return None if share is None else round(share, 4)


def same_rows(a: list[TraceRow], b: list[TraceRow]) -> float | None:
    """Share of problems whose chosen trajectory (step texts and teachers) and final
    answer are the same in both runs."""

    def content(r: TraceRow) -> tuple[Any, ...]:
        return (tuple((s.text, s.teacher) for s in r.steps), r.final_answer)

    by_id = {r.id: content(r) for r in b}
    if not a:
        return None
    return round(sum(by_id.get(r.id) == content(r) for r in a) / len(a), 4)


def emit(figures: dict[str, Any], json_path: str | None) -> None:
    """The figures as ``name=value`` lines (last), and as JSON when asked."""
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    for name, value in figures.items():
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            click.echo(f"{name}={value}")


def r3(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
