"""What a dataset costs on GPUs: CoRD against curation with every pool on a simulated GPU.

    python ops/bench/costs.py gpu                  # the figures `make bench` prints
    python ops/bench/costs.py gpu --problems 96 --in-flight 8,32,128

Every pool runs the `sim` engine (workers/engines/sim.py): one simulated card per worker
serving a model of a real shape, priced by a roofline calibrated on measured cards
(`simcost`), with continuous batching and a block prefix cache of the card's KV
capacity. The real coordinator, Redis, Celery workers and routing run on top, so the
step barrier, the batching and the admission are the fleet's own. Nothing the engine
writes is data: its rows stay in a temporary folder and are deleted.

Figures of one run are taken over its steady state: from the 10th to the 90th percentile
of its problems' ends, so neither the ramp-up nor the tail (the last problems, with
servers running dry) prices a problem. Problems end in waves, so the work done in that
window is counted in tokens: the teachers' decoded tokens in it, over the run's mean
generated tokens per problem (its rows), are the problems' worth it did.

- ``gpu_s_per_problem``: GPU-seconds per problem, all servers (the rented time, idle
  included): the servers' simulated clocks over the window / problems' worth of work
  done in it. A clock leaves out the moments its engine noticed a pass's end late (the
  host's Python, `clock_lag_share`), which a card would not lose;
  ``gpu_s_per_problem_wall`` counts them (servers x the window's real time, scaled): on a
  slow host it prices the simulator's own lag as GPU time;
- ``teacher_util``: share of a teacher server's time decoding;
- ``barrier_idle_share``: share of a teacher server's time with nothing to run while
  problems are in flight: they wait on selection (scoring, the step barrier);
- ``evicted_prefill_share``: prefill tokens on prefixes the cache had held and evicted,
  of all prefill tokens;
- ``fleet_overhead_share``: of the time from sending a task to its replies, the share
  spent outside the engines (queues, Celery, Redis, the coordinator): small, or the
  time scale is too fast for this machine;
- ``step_tail_share``: of CoRD's step time (its start to its last candidate scored), the
  share spent on the slowest candidate alone once every other one was done: the most a
  step could gain by selecting without it (`harness.StepTimer`);
- ``step_slowest_over_mean``: the median over steps of the slowest candidate's time over
  the mean candidate's, from the step's start.

Curation runs at the N whose generated tokens reach CoRD's (`matched_curation_samples`);
the per-correct ratio takes the lab's accuracies (`--accuracy`, from `make lab-eval`).
``_before`` figures run the same problems under the scheduling the fleet had before
(replies per task, a 0.2 s hold of partial batches, admission by count only).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from harness import (
    BenchFleet,
    FleetRun,
    default_redis_url,
    emit,
    machine,
    r3,
    redis_at,
    run_fleet,
    synthetic_problems,
    tokens_of,
)

from cord.common import env
from cord.common.config import RunConfig, allow_bench_engine
from cord.common.log import configure
from cord.common.messages import EngineStats, SimStats
from cord.coordinator.evaluate import matched_curation_samples

TEACHERS = ("t1", "t2", "t3")
META = "meta"
# The scheduling before streamed replies, server pools without a hold and admission by
# KV capacity: what `_before` figures run under.
BEFORE: dict[str, Any] = {"stream_results": False, "hold_s": 0.2, "kv_admission": False}
# (model shape, card) of the runs: the paper's 32B teachers on H100s, and 7B teachers on
# 24 GB cards (cheap spot GPUs: AWS g5's A10G).
SETUPS: dict[str, tuple[str, str]] = {"32b_h100": ("qwen2.5-32b", "h100-sxm")}
SECOND: dict[str, tuple[str, str]] = {"7b_a10g": ("qwen2.5-7b", "a10g")}
# CoRD's and curation's accuracy in the lab (docs/lab.md: `make lab-eval`, 300 held-out
# problems): what a correct trace costs depends on how many come out right.
LAB_ACCURACY = "cord=0.780,curation=0.573"


def sim_dict(
    redis_url: str,
    namespace: str,
    shape: str,
    card: str,
    scale: float,
    in_flight: int,
    scheduling: dict[str, Any],
    meta_teacher: bool = False,
    trace_tokens: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Three teachers and a meta-prover of `shape`, each on one simulated `card`; CoRD as
    in the paper (B = 4, one sample per beam), budgets of a long-CoT run; `trace_tokens`
    other than the engine's (paper-like) lengths."""
    pool: dict[str, Any] = {"engine": "sim", "model": shape, "card": card, "time_scale": scale}
    if trace_tokens is not None:
        pool["trace_tokens"] = list(trace_tokens)
    teachers = [{"name": n, **pool} for n in TEACHERS]
    meta = {"name": TEACHERS[0]} if meta_teacher else {"name": META, **pool}
    return {
        "redis_url": redis_url,
        "namespace": namespace,
        "teachers": teachers,
        "meta_prover": meta,
        "search": {
            "strategy": "cord",
            "beam_width": 4,
            "samples_per_beam": 1,
            "temperature": 0.6,
            "thinking_budget": 16384,
            "max_step_tokens": 512,
            "answer_budget": 32,
        },
        "max_in_flight": in_flight,
        "scheduling": scheduling,
        "reliability": {"heartbeat_s": 0.5, "worker_lost_s": 60.0, "task_timeout_s": 3600},
    }


def with_scheduling(cfg: RunConfig, scheduling: dict[str, Any], in_flight: int) -> RunConfig:
    return cfg.model_copy(
        update={
            "scheduling": cfg.scheduling.model_validate(scheduling),
            "max_in_flight": in_flight,
        }
    )


@dataclass
class Window:
    """Engine counters at the 10th and the 90th percentile of a run's problem ends."""

    fleet: BenchFleet
    problems: int
    marks: list[tuple[int, float, dict[str, EngineStats]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.edges = {max(1, self.problems // 10), self.problems - self.problems // 10}

    def on_finished(self, count: int, at_s: float) -> None:
        if count in self.edges:
            self.marks.append((count, at_s, self.fleet.engine_stats()))


def sims(before: dict[str, EngineStats], after: dict[str, EngineStats]) -> dict[str, SimStats]:
    return {
        name: (e.sim or SimStats()).minus(before[name].sim or SimStats())
        for name, e in after.items()
        if name in before
    }


@dataclass
class CostRun:
    """One strategy's run on simulated GPUs, priced over its steady state."""

    NAMES = (
        "gpu_s_per_problem",
        "gpu_s_per_problem_wall",
        "teacher_util",
        "barrier_idle_share",
        "evicted_prefill_share",
        "fleet_overhead_share",
        "clock_lag_share",
        "mean_batch",
        "step_tail_share",
        "step_slowest_over_mean",
        "wall_s",
        "partial_replies",
        "done",
        "failed",
    )

    run: FleetRun
    window: Window
    scale: float
    teachers: list[str]  # the workers that expand

    def span(self) -> tuple[float, dict[str, SimStats], float]:
        """Real seconds, the engines' counters and their clocks' seconds over the steady
        state; over the whole run when the teachers decoded nothing in it by their
        heartbeats (a steady state shorter than a heartbeat: a tiny run), its real time
        scaled standing for the clocks."""
        if len(self.window.marks) >= 2:
            (_, t1, e1), (_, t2, e2) = self.window.marks[0], self.window.marks[-1]
            grown = sims(e1, e2)
            if any(s.decode_seq_steps for w, s in grown.items() if self.teaches(w)):
                return t2 - t1, grown, sum(s.clock_s for s in grown.values())
        whole = {k: e.sim or SimStats() for k, e in self.run.engine.items()}
        return self.run.wall_s, whole, len(whole) * self.run.wall_s / self.scale

    def teaches(self, worker: str) -> bool:
        return worker.split("-")[0] in self.teachers

    def figures(self) -> dict[str, float | None]:
        real_s, grown, clocks_s = self.span()
        servers = len(grown)
        window_s = real_s / self.scale
        expanders = [w for w in grown if self.teaches(w)]
        teach = [grown[w] for w in expanders]
        generated = sum(s.decode_seq_steps for s in teach)  # tokens, counted as decoded
        per_problem = tokens_of(self.run.rows)
        worth = generated / per_problem if per_problem else 0.0
        clock = sum(s.clock_s for s in teach)
        prefill = sum(s.prefill_tokens for s in grown.values())
        evicted = sum(s.evicted_prefill_tokens for s in grown.values())
        lag = sum(s.lag_s for s in grown.values())
        return {
            "gpu_s_per_problem": round(clocks_s / worth, 1) if worth else None,
            "gpu_s_per_problem_wall": round(servers * window_s / worth, 1) if worth else None,
            "teacher_util": r3(sum(s.decode_s for s in teach) / clock) if clock else None,
            "barrier_idle_share": r3(max(0.0, 1 - sum(s.busy_s for s in teach) / clock))
            if clock
            else None,
            "evicted_prefill_share": r3(evicted / prefill) if prefill else None,
            "fleet_overhead_share": r3(self.run.fleet_overhead_share),
            "clock_lag_share": r3(lag / (servers * real_s)) if real_s else None,
            "mean_batch": r3(
                sum(s.decode_seq_steps for s in teach) / max(1, sum(s.decode_passes for s in teach))
            ),
            "step_tail_share": r3(self.run.step_tail_share),
            "step_slowest_over_mean": r3(statistics.median(self.run.slowest_over_mean))
            if self.run.slowest_over_mean
            else None,
            "done": len(self.run.rows),
            "failed": self.run.failed,
            "wall_s": round(self.run.wall_s, 1),
            "peak_in_flight": self.run.peak_in_flight,
            "partial_replies": self.run.partial_replies,
        }


def run_costed(fleet: BenchFleet, cfg: RunConfig, problems: int, tag: str, scale: float) -> CostRun:
    window = Window(fleet, problems)
    run = run_fleet(
        cfg, synthetic_problems(problems, tag), fleet=fleet, on_finished=window.on_finished
    )
    teachers = list(cfg.teacher_names)
    return CostRun(run, window, scale, teachers)


def compare(
    fleet: BenchFleet,
    base: RunConfig,
    scheduling: dict[str, Any],
    in_flight: int,
    problems: int,
    scale: float,
    samples: int | None,
    accuracy: dict[str, float],
    tag: str,
) -> tuple[dict[str, Any], int]:
    """CoRD, then curation at the N that reaches CoRD's tokens (or `samples`), on the same
    problems (`tag`'s: the same in every run of the benchmark, another in each
    comparison of one fleet, whose caches outlive a run) under `scheduling`: their
    figures and the ratios."""
    cfg = with_scheduling(base, scheduling, in_flight)
    cord = run_costed(fleet, cfg, problems, tag, scale)
    n = samples or matched_curation_samples(cfg, cord.run.rows)
    search = cfg.search.model_copy(update={"strategy": "curation", "curation_samples": n})
    curation = run_costed(fleet, cfg.model_copy(update={"search": search}), problems, tag, scale)
    c, k = cord.figures(), curation.figures()
    out: dict[str, Any] = {f"cord_{name}": v for name, v in c.items()}
    out.update({f"curation_{name}": v for name, v in k.items()})
    out["curation_samples"] = n
    if c.get("gpu_s_per_problem") and k.get("gpu_s_per_problem"):
        ratio = c["gpu_s_per_problem"] / k["gpu_s_per_problem"]  # type: ignore[operator]
        out["ratio"] = r3(ratio)
        out["ratio_per_correct"] = r3(ratio * accuracy["curation"] / accuracy["cord"])
    if c.get("gpu_s_per_problem_wall") and k.get("gpu_s_per_problem_wall"):
        out["ratio_wall"] = r3(c["gpu_s_per_problem_wall"] / k["gpu_s_per_problem_wall"])  # type: ignore[operator]
    click.echo(
        f"in flight {in_flight} {scheduling or 'default scheduling'}: "
        f"cord {c.get('gpu_s_per_problem')} GPU-s/problem, curation N={n} "
        f"{k.get('gpu_s_per_problem')}: ratio {out.get('ratio')}",
        err=True,
    )
    return out, n


@click.group()
def main() -> None:
    """The fleet on simulated GPUs (see the module docstring)."""
    configure(level="WARNING")
    allow_bench_engine()
    env.unset(env.NAMESPACE)


@main.command()
@click.option("--redis-url", default=default_redis_url, show_default="CORD_REDIS_URL or local")
@click.option("--problems", default=20, show_default=True, help="Problems per run.")
@click.option(
    "--side-problems",
    default=12,
    show_default=True,
    help="Problems per run of the side shapes (meta-prover as a teacher, 7B on 24 GB).",
)
@click.option(
    "--in-flight",
    default=64,
    show_default=True,
    help="max_in_flight of the main runs: a ceiling after (KV admission), the count before.",
)
@click.option(
    "--sweep",
    default="8,16",
    show_default=True,
    help="Problems in flight, admitted by count, for the ratio against them.",
)
@click.option("--scale", default=0.03, show_default=True, help="Real seconds per GPU second.")
@click.option("--accuracy", default=LAB_ACCURACY, show_default=True)
@click.option("--second-shape/--no-second-shape", default=True, show_default=True)
@click.option("--meta-teacher/--no-meta-teacher", default=True, show_default=True)
@click.option(
    "--trace-tokens",
    default=None,
    help="LO,HI: trace lengths other than the engine's 2000-16000 (a quick look).",
)
@click.option("--json", "json_path", default=None, help="Also write the figures here.")
def gpu(
    redis_url: str,
    problems: int,
    side_problems: int,
    in_flight: int,
    sweep: str,
    scale: float,
    accuracy: str,
    second_shape: bool,
    meta_teacher: bool,
    trace_tokens: str | None,
    json_path: str | None,
) -> None:
    """GPU-seconds per problem, CoRD against curation: 32B teachers and meta-prover on
    H100s under today's scheduling and the one before, against problems in flight, with
    the meta-prover one of the teachers, and 7B teachers on 24 GB cards."""
    acc = {k: float(v) for k, v in (p.split("=") for p in accuracy.split(","))}
    figures: dict[str, Any] = {"machine": machine(), "gpu_time_scale": scale}
    counts = [int(x) for x in sweep.split(",") if x.strip()]
    lengths = None
    if trace_tokens:
        lo, hi = (int(x) for x in trace_tokens.split(","))
        lengths = (lo, hi)

    def fleet_of(tmp: str, shape: str, card: str, meta: bool = False) -> BenchFleet:
        ns = f"costs-{uuid.uuid4().hex[:8]}"
        data = sim_dict(redis_url, ns, shape, card, scale, 1, {}, meta, lengths)
        return BenchFleet(data, Path(tmp))

    with tempfile.TemporaryDirectory(prefix="cord-costs-") as tmp, redis_at(redis_url, Path(tmp)):
        shape, card = SETUPS["32b_h100"]
        with fleet_of(tmp, shape, card) as fleet:
            fleet.up()
            now, n = compare(fleet, fleet.cfg, {}, in_flight, problems, scale, None, acc, "now")
            put(figures, "gpu", now)
            cord_util, cur_util = now.get("cord_teacher_util"), now.get("curation_teacher_util")
            figures["gpu_teacher_util_ratio"] = (
                r3(cord_util / cur_util) if cord_util and cur_util else None
            )
            was, _ = compare(fleet, fleet.cfg, BEFORE, in_flight, problems, scale, n, acc, "before")
            put(figures, "gpu", was, suffix="_before")
            for m in counts:
                count = {"kv_admission": False}
                at, _ = compare(
                    fleet, fleet.cfg, count, m, max(problems, 2 * m), scale, n, acc, f"count{m}"
                )
                figures[f"gpu_cord_vs_curation_ratio_in_flight_{m}"] = at.get("ratio")
                figures[f"gpu_s_per_problem_cord_in_flight_{m}"] = at.get("cord_gpu_s_per_problem")
        if meta_teacher:  # the meta-prover is teacher t1: one pool serves both
            with fleet_of(tmp, shape, card, meta=True) as fleet:
                fleet.up()
                got, _ = compare(
                    fleet, fleet.cfg, {}, in_flight, side_problems, scale, n, acc, "now"
                )
                put(figures, "gpu_meta_teacher", got)
        if second_shape:
            for name, (shape, card) in SECOND.items():
                with fleet_of(tmp, shape, card) as fleet:
                    fleet.up()
                    got, _ = compare(
                        fleet, fleet.cfg, {}, in_flight, side_problems, scale, None, acc, "now"
                    )
                    put(figures, f"gpu_{name}", got)
    emit(figures, json_path)


def put(figures: dict[str, Any], prefix: str, got: dict[str, Any], suffix: str = "") -> None:
    """`compare`'s figures under the names `make bench` prints."""
    figures[f"{prefix}_cord_vs_curation_ratio{suffix}"] = got.get("ratio")
    figures[f"{prefix}_cord_vs_curation_ratio_per_correct{suffix}"] = got.get("ratio_per_correct")
    figures[f"{prefix}_cord_vs_curation_ratio_wall{suffix}"] = got.get("ratio_wall")
    # CostRun's figure names, as printed (only GPU-seconds is renamed: `gpu_s_per_problem`)
    names = {key: key for key in CostRun.NAMES} | {
        "gpu_s_per_problem": "s_per_problem",
        "gpu_s_per_problem_wall": "s_per_problem_wall",
    }
    for strategy in ("cord", "curation"):
        for key, name in names.items():
            figures[f"{prefix}_{name}_{strategy}{suffix}"] = got.get(f"{strategy}_{key}")
    figures[f"{prefix}_barrier_idle_share{suffix}"] = got.get("cord_barrier_idle_share")
    figures[f"{prefix}_evicted_prefill_share{suffix}"] = got.get("cord_evicted_prefill_share")
    figures[f"{prefix}_curation_samples{suffix}"] = got.get("curation_samples")


if __name__ == "__main__":
    sys.exit(main())
