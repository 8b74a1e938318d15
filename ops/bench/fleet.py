"""Fleet benchmarks: what the coordinator, Redis and the workers cost beyond the models.

    python ops/bench/fleet.py dispatch --problems 2000      # bench engine: items/s, step latency
    python ops/bench/fleet.py memory --problems 10000       # bench engine: coordinator RSS
    python ops/bench/fleet.py overhead --problems 24        # lab models: fleet vs one process,
                                                            #   and CoRD vs curation
    python ops/bench/fleet.py cache --problems 16           # lab models: prefix-cache hits
                                                            #   with and without affinity
    python ops/bench/fleet.py overhead --device cuda --model /path/to/model   # on a GPU box

Each subcommand starts what it needs: a Redis if none answers at ``--redis-url`` (or
CORD_REDIS_URL), real ``cord-worker`` processes (through the ``worker`` subcommand, the
only way a worker may load the `bench` engine), and runs the coordinator in this process.
It prints its figures, then ``name=value`` lines; ``--json PATH`` also writes them as JSON
(`ops/bench/run_all.py`, ``make bench``, collects them).

Rows: every run writes its rows to a temporary folder that is deleted at the end. Rows of
the `bench` engine are placeholders and never leave this script; the run config refuses
that engine everywhere else (`cord.common.config.allow_bench_engine`).

Problems come from the lab (`cord-coord lab-problems`), settings from
``examples/demo.yaml`` (three teachers, B = 4, T = 0.6, the same budgets).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import redis
import yaml

from cord.common.config import RunConfig, allow_bench_engine, config_from_dict
from cord.common.keys import Keys
from cord.common.log import configure
from cord.common.messages import EngineStats, Heartbeat, Score
from cord.coordinator.driver import Coordinator, Observer
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.redis_server import ping, start_redis
from cord.coordinator.rows import TraceRow, summarize
from cord.coordinator.rundir import read_failures, read_traces
from cord.coordinator.search import Outcome, Search, Work, make_search
from cord.coordinator.store import Store
from cord.lab.arith import make_problems

ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = ROOT / "examples" / "demo.yaml"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
# Seeds of the problem sets: none of them is a training, evaluation or demo seed.
SEED = 4242
# A vLLM CPU server per pool, as examples/vllm.yaml sets it up (blocks of 32 tokens: the
# CPU build's 128 would cache none of the lab's short prompts).
VLLM_CPU: dict[str, Any] = {
    "max_model_len": 1024,
    "vllm_args": ["--block-size", "32"],
    "startup_timeout_s": 900,
}
WARMUP_SEED = 4243


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
@contextmanager
def redis_at(url: str, workdir: Path) -> Iterator[str]:
    """The Redis at `url` if it answers; otherwise one started here (no AOF: nothing of
    a benchmark needs to survive), stopped afterwards."""
    if ping(url):
        yield url
        return
    proc = start_redis(url, workdir / "redis", appendonly=False)  # returns once it answers
    click.echo(f"no Redis answered at {url}; started one", err=True)
    try:
        yield url
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


def drop_namespace(client: redis.Redis, ns: str) -> None:
    """Every key of a benchmark's namespace: state, queues and kombu's queue bindings."""
    for pattern in (f"{ns}:*", f"{ns}.*", f"_kombu.binding.{ns}.*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])


class Fleet:
    """Real `cord-worker` processes (``workers_per_pool`` per pool) for one config,
    started through this script's ``worker`` subcommand, stopped as process groups."""

    def __init__(self, data: dict[str, Any], workdir: Path, workers_per_pool: int = 1) -> None:
        self.data = data
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.path = workdir / f"{data['namespace']}.yaml"
        self.path.write_text(yaml.safe_dump(data), encoding="utf-8")
        self.cfg = config_from_dict(data, source=str(self.path))
        self.workers_per_pool = workers_per_pool
        self.procs: list[subprocess.Popen[bytes]] = []
        self.client = redis.Redis.from_url(self.cfg.redis_url)

    def start(self, timeout_s: float = 600.0) -> float:
        """Start the workers and wait until all have registered; returns the seconds."""
        start = time.monotonic()
        for model in self.cfg.model_names:
            for slot in range(self.workers_per_pool):
                self.procs.append(self._spawn(model, f"{model}-{slot}"))
        want = len(self.procs)
        workers_key = Keys(self.cfg.namespace).workers
        while self.client.hlen(workers_key) < want:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() - start > timeout_s:
                self.stop()
                raise click.ClickException(f"workers did not start; logs in {self.logs}")
            time.sleep(0.2)
        return time.monotonic() - start

    def _spawn(self, model: str, name: str) -> subprocess.Popen[bytes]:
        args = [sys.executable, __file__, "worker", "--config", str(self.path)]
        args += ["--teacher", model, "--name", f"{name}@bench"]
        with open(self.logs / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def replace(self, index: int, sig: signal.Signals) -> None:
        """Stop worker `index` with `sig` (SIGKILL: a vanished spot GPU; SIGTERM: a
        notice, its task handed back) and start a new worker of its pool in its place,
        under a new name (as a new spot machine comes up)."""
        old = self.procs[index]
        os.killpg(old.pid, sig)
        old.wait(60)
        model = self.cfg.model_names[index // self.workers_per_pool]
        self.procs[index] = self._spawn(model, f"{model}-r{uuid.uuid4().hex[:6]}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = []
        drop_namespace(self.client, self.cfg.namespace)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) each worker has used so far, by pool slot, its
        live child processes included (a server engine's server)."""
        names = [f"{m}-{s}" for m in self.cfg.model_names for s in range(self.workers_per_pool)]
        stats = _proc_stats()
        return {name: _tree_cpu_s(p.pid, stats) for name, p in zip(names, self.procs, strict=True)}

    def engine_stats(self) -> dict[str, EngineStats]:
        """The workers' engine counters from their last heartbeats, by worker name."""
        raw = self.client.hgetall(Keys(self.cfg.namespace).workers)
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


def _tree_cpu_s(root: int, stats: dict[int, tuple[int, float]]) -> float:
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (parent, _) in stats.items():
        children[parent].append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo += children.get(pid, [])
    return total


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
    finished work spent waiting for the rest of its step."""

    def __init__(self, max_in_flight: int) -> None:
        self.coordinator: Coordinator | None = None
        self.max_in_flight = max_in_flight
        self._open: dict[str, tuple[str, float]] = {}
        self._arrived: dict[str, list[float]] = defaultdict(list)  # results of an open phase
        self.step_latencies: list[float] = []
        self.steps = 0
        self.wait_s = 0.0
        self.phase_s = 0.0
        self.peak_in_flight = 0
        self.rss_at_peak_mib = 0.0

    def served(self, pid: str, model: str, worker: str) -> None:
        if pid in self._open:
            self._arrived[pid].append(time.perf_counter())

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
    fleet: Fleet | None = None,
) -> FleetRun:
    """`problems` through the live fleet, timed by a `StepTimer`, in a problem-state
    namespace of their own (as `cord-coord eval` does); rows to a temporary folder.
    With `fleet`, the CPU time of its workers (their servers included) during the run is
    recorded too, and their engines' counters over the run (`engine`: read from the
    workers' heartbeats, once a fresh one has come after the run)."""
    if strategy is not None:
        cfg = cfg.model_copy(
            update={"search": cfg.search.model_copy(update={"strategy": strategy})}
        )
    state_ns = f"{cfg.namespace}:run:{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as out:
        timer = StepTimer(cfg.max_in_flight)
        coord = Coordinator(cfg, out, state_namespace=state_ns, observer=timer)
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
            drop_namespace(coord.redis, state_ns)
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
    )


# -- the same search in one process ------------------------------------------------------
@dataclass
class InProcessRun:
    wall_s: float
    rows: list[TraceRow]
    calls: int
    cpu_s: float = 0.0


def load_engines(cfg: RunConfig) -> dict[str, Any]:
    from cord.workers.engines import load_engine

    return {name: load_engine(cfg.pool(name)) for name in cfg.model_names}


def release_device_memory(device: str) -> None:
    """Give freed GPU memory back, so the fleet's workers started next can have it."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def run_in_process(
    cfg: RunConfig, problems: list[Problem], engines: dict[str, Any], strategy: str | None = None
) -> InProcessRun:
    """The same strategy on the same problems with the engines called directly: no
    Redis, no Celery, no messages. Batching follows `Coordinator._flush`: up to
    ``max_in_flight`` problems at once; each round gathers all pending work of a
    (kind, model) and splits it into batches of that pool's ``max_batch``; results are
    fed back batch by batch and the new work waits for the next round."""
    if strategy is not None:
        cfg = cfg.model_copy(
            update={"search": cfg.search.model_copy(update={"strategy": strategy})}
        )
    waiting = deque(problems)
    searches: dict[str, Search] = {}
    outbox: dict[tuple[str, str], list[tuple[str, Work]]] = defaultdict(list)
    rows: list[TraceRow] = []
    calls = 0

    def apply(pid: str, outcome: Outcome) -> None:
        for w in outcome.work:
            outbox[(w.kind, w.model)].append((pid, w))
        if outcome.row is not None:
            rows.append(outcome.row)
            del searches[pid]

    start, cpu = time.perf_counter(), process_cpu_s()
    while waiting or searches:
        while waiting and len(searches) < cfg.max_in_flight:
            p = waiting.popleft()
            searches[p.id] = make_search(p, cfg)
            apply(p.id, searches[p.id].start())
        if not outbox:
            raise RuntimeError(f"in-process run stalled with {len(searches)} open problems")
        current = dict(outbox)
        outbox.clear()
        for (kind, model), entries in current.items():
            size = cfg.pool(model).max_batch
            engine = engines[model]
            for i in range(0, len(entries), size):
                chunk = entries[i : i + size]
                items = [w.item for _, w in chunk]
                calls += 1
                if kind == "expand":
                    results = engine.expand(items)
                elif kind == "answer":
                    results = engine.answer(items)
                else:
                    results = engine.score(items)
                owner = {w.item.key: (pid, w) for pid, w in chunk}
                for r in results:
                    pid, w = owner[r.key]
                    search = searches.get(pid)
                    if search is None:
                        continue
                    if r.error:
                        raise RuntimeError(f"in-process {kind} of {r.key} failed: {r.error}")
                    if isinstance(r, Score):
                        apply(pid, search.on_score(w.key, r))
                    else:
                        apply(pid, search.on_generation(w.key, r))
        for key in [k for k, v in outbox.items() if not v]:
            del outbox[key]
    return InProcessRun(time.perf_counter() - start, rows, calls, process_cpu_s() - cpu)


# -- CoRD against curation -----------------------------------------------------------------
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
        servers' own counters where they have them, and generated tokens)."""
        wall = sum(r.wall_s for r in runs)
        busy = [e.busy_wall_s for r in runs for e in r.engine.values()]
        workers = max(1, len(runs[0].engine)) if runs else 1
        cpu = sum(sum(r.worker_cpu_s.values()) for r in runs)
        meta = sum(
            v for r in runs for k, v in r.worker_cpu_s.items() if k.startswith(f"{self.meta}-")
        )
        prefill = generated = scoring = 0.0
        for r in runs:
            for name, e in r.engine.items():
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
    fleet: Fleet,
    first: FleetRun,
    problems: int,
    pairs: int,
    seed: int = SEED,
    make: Callable[[int, int], list[Problem]] = lab_problems,
) -> PairRuns:
    """`pairs` CoRD/curation pairs through `fleet`; `first` is CoRD's run on
    ``make(problems, seed)``, which sets curation's N and opens the first pair. Pair k
    runs on ``make(problems, seed + k)``."""
    from cord.coordinator.evaluate import matched_curation_samples

    cfg = fleet.cfg
    n = matched_curation_samples(cfg, first.rows)
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


# -- commands -------------------------------------------------------------------------------
url_option = click.option(
    "--redis-url",
    default=lambda: os.environ.get("CORD_REDIS_URL", DEFAULT_URL),
    show_default="CORD_REDIS_URL or " + DEFAULT_URL,
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
    os.environ.pop("CORD_NAMESPACE", None)  # each run picks its own namespace


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
        fleet = Fleet(data, Path(tmp), workers_per_pool)
        try:
            fleet.start()
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


def synthetic_problems(n: int, tag: str) -> list[Problem]:
    """Problems for the bench engine (it never reads them): ids and a reference answer."""
    return [
        Problem(id=f"{tag}-{i}", question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(n)
    ]


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
        fleet = Fleet(data, Path(tmp), workers_per_pool)
        client = fleet.client
        redis_before = int(client.info("memory")["used_memory"])
        sampler = RedisSampler(client)
        try:
            fleet.start()
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
        fleet = Fleet(data, Path(tmp))
        store = Store(fleet.client, Keys(ns))
        left: list[int] = []
        rss: list[float] = []
        try:
            fleet.start()
            with tempfile.TemporaryDirectory(prefix="cord-bench-") as out:
                coord = Coordinator(fleet.cfg, out, follow=True)
                thread = threading.Thread(target=coord.run, daemon=True)
                thread.start()
                start = time.perf_counter()
                for wave in range(waves):
                    store.enqueue(synthetic_problems(problems, f"w{wave}"))
                    time.sleep(0.3)  # work is out: the stop lands mid-wave
                    sig = signal.SIGKILL if wave % 2 == 0 else signal.SIGTERM
                    fleet.replace(wave % len(fleet.procs), sig)
                    want = (wave + 1) * problems
                    deadline = time.monotonic() + 300
                    while sum(store.counts()[k] for k in ("done", "failed")) < want:
                        if time.monotonic() > deadline or not thread.is_alive():
                            raise click.ClickException(f"wave {wave} did not drain")
                        time.sleep(0.1)
                    time.sleep(0.5)  # the last rows' bookkeeping closes on the next pass
                    left.append(sum(coord.sizes().values()))
                    rss.append(rss_mib()[0])
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
        f"re-sent; left in flight after each drain {left}; RSS {rss[0]:.0f} -> "
        f"{rss[-1]:.0f} MiB; {wall:.1f}s"
    )
    emit(figures, json_path)


class RedisSampler:
    """Redis ``used_memory`` every half second in a thread; keeps the peak."""

    def __init__(self, client: redis.Redis) -> None:
        import threading

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
    info = machine()
    threads = [int(t) for t in inproc_threads.split(",") if t.strip()]
    todo = lab_problems(problems, SEED)
    warm = lab_problems(warmup, WARMUP_SEED)
    figures: dict[str, Any] = {"overhead_problems": problems, "overhead_device": device}
    inproc: dict[int, InProcessRun] = {}
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as tmp, redis_at(redis_url, Path(tmp)):
        ns = f"bench-{uuid.uuid4().hex[:8]}"
        data = fleet_dict(redis_url, ns, model=model, device=device, cpu_threads=1)
        # One process, before any worker exists: nothing else competes for the cores.
        for t in threads:
            cfg_t = config_from_dict(
                fleet_dict(redis_url, ns, model=model, device=device, cpu_threads=t)
            )
            engines = load_engines(cfg_t)
            if warm:
                run_in_process(cfg_t, warm, engines)
            inproc[t] = run_in_process(cfg_t, todo, engines)
            del engines
            release_device_memory(device)
            click.echo(f"one process, {t} thread(s): {inproc[t].wall_s:.1f}s", err=True)
        fleet = Fleet(data, Path(tmp), 1)
        try:
            figures["overhead_worker_start_s"] = r3(fleet.start())
            if warm:
                run_fleet(fleet.cfg, warm)
            run = run_fleet(fleet.cfg, todo, fleet=fleet)
            click.echo(f"fleet, cord: {run.wall_s:.1f}s; {run.cpu_line()}", err=True)
            pairs_run: PairRuns | None = None
            if curation:
                pairs_run = cord_curation_pairs(fleet, run, problems, pairs)
        finally:
            fleet.stop()
    best_t = min(inproc, key=lambda t: inproc[t].wall_s)
    base = inproc[best_t]
    for t, r in inproc.items():
        figures[f"inprocess_threads{t}_wall_s"] = r3(r.wall_s)
    figures.update(
        {
            "inprocess_wall_s": r3(base.wall_s),
            "inprocess_threads": best_t,
            "fleet_cord_wall_s": r3(run.wall_s),
            "fleet_overhead_ratio": r3(run.wall_s / base.wall_s),
            # The fleet may use every core, one process only its threads: its CPU
            # seconds (coordinator and workers) over the one process's show the cost
            # that more cores hide.
            "fleet_cpu_s": round(run.cpu_s, 2),
            "inprocess_cpu_s": round(base.cpu_s, 2),
            "fleet_cpu_overhead_ratio": r3(run.cpu_s / base.cpu_s) if base.cpu_s else None,
            "fleet_rows_same_as_inprocess": same_rows(run.rows, base.rows),
            "fleet_cord_done": len(run.rows),
            "fleet_cord_failed": run.failed,
            "cord_tokens_per_problem": round(tokens_of(run.rows), 1),
            "cord_step_latency_p50_s": r3(percentile(run.step_latencies, 50)),
            "cord_step_latency_p99_s": r3(percentile(run.step_latencies, 99)),
            "cord_tasks": run.summary.get("tasks_sent"),
            "cord_items": run.summary.get("items_sent"),
        }
    )
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
            fleet = Fleet(fleet_dict(redis_url, ns, affinity=affinity), Path(tmp), workers_per_pool)
            try:
                fleet.start()
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
