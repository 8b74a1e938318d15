"""``make bench``: every fleet benchmark in one run, figures into docs/benchmarks.md.

    python ops/bench/run_all.py                       # the full run (budget: 30 min on 2 cores)
    python ops/bench/run_all.py --no-doc --only dispatch --dispatch-problems 200   # a look

Each benchmark of `ops/bench/fleet.py` runs in a process of its own, one after another:
they never share the cores, and the coordinator's memory is measured in a process that
did nothing else. Printed: the machine (cores, CPU model, load average at the start),
each benchmark's own output, a table of the figures against their targets, and last the
``name=value`` lines. The figures replace the part of docs/benchmarks.md between
``<!-- make bench: begin -->`` and ``<!-- make bench: end -->`` (added at the end if the
markers are missing); the rest of the file, the GPU figures among it, is left as it is.
Sizes are flags; the budget is 30 minutes on a 2-core machine. The defaults took 34-45
minutes on these hosts until 2026-12-07; then the repeats that add least were cut: three
CoRD/curation pairs in `overhead` (five before), two long-prefix pairs of 12 problems in
`vllm_affinity` (three of 16) and 45 s of admission in `backlog` (90). Fewer problems
for the GPU projection's side shapes (8) and its in-flight sweep were tried and undone:
with servers less full the figures moved (7B teachers 1.37 against 1.0-1.1).
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FLEET = HERE / "fleet.py"
BEGIN = "<!-- make bench: begin -->"
END = "<!-- make bench: end -->"
BUDGET_S = 30 * 60

# name, target, direction (how the target reads), the paper's figure where it has one
TARGETS: list[tuple[str, float | None, str, str]] = [
    ("dispatch_tasks_per_s", 1000, ">=", ""),
    ("step_latency_p50_s", None, "", ""),
    ("step_latency_p99_s", None, "", ""),
    ("fleet_overhead_ratio", 1.10, "<=", ""),
    ("fleet_cpu_overhead_ratio", None, "", ""),
    ("cord_vs_curation_wall_ratio", 1.25, "<=", "1.72"),
    ("cord_vs_curation_wall_ratio_min", None, "", ""),
    ("cord_vs_curation_wall_ratio_max", None, "", ""),
    ("cord_vs_curation_wall_ratio_total", None, "", ""),
    ("cord_vs_curation_cpu_ratio", None, "", ""),
    ("cord_vs_curation_token_ratio", None, "", ""),
    ("cord_vs_curation_model_token_ratio", None, "", ""),
    ("cord_selection_wait_share", None, "", ""),
    ("prefix_cache_hit_affinity", None, "", ""),
    ("prefix_cache_hit_no_affinity", None, "", ""),
    ("coordinator_rss_mib_10k", 1024, "<=", ""),
    ("redis_used_mib_peak", None, "", ""),
    ("memory_steps_per_s", None, "", ""),
    ("hf_tokens_per_s", None, "", ""),
    ("vllm_tokens_per_s", None, "", ""),
    ("vllm_prefix_cache_hit", None, "", ""),
    ("vllm_server_prefix_cache_hit", None, "", ""),
    ("vllm_vs_hf_wall_ratio", None, "", ""),
    ("cord_vs_curation_wall_ratio_vllm", None, "", "1.72"),
    ("cord_vs_curation_wall_ratio_vllm_min", None, "", ""),
    ("cord_vs_curation_wall_ratio_vllm_max", None, "", ""),
    ("cord_vs_curation_wall_ratio_vllm_total", None, "", ""),
    ("cord_vs_curation_token_ratio_vllm", None, "", ""),
    ("cord_vs_curation_model_token_ratio_vllm", None, "", ""),
    ("cord_busy_share_vllm", None, "", ""),
    ("curation_busy_share_vllm", None, "", ""),
    ("cord_scoring_cpu_share_vllm", None, "", ""),
    ("cord_selection_wait_share_vllm", None, "", ""),
    ("cord_prefill_tokens_per_problem_vllm", None, "", ""),
    ("curation_prefill_tokens_per_problem_vllm", None, "", ""),
    ("vllm_prefix_cache_hit_affinity", 0.85, ">=", ""),
    ("vllm_prefix_cache_hit_no_affinity", None, "", ""),
    ("affinity_wall_ratio_lab", None, "", ""),
    ("long_prefix_cache_hit_affinity", 0.85, ">=", ""),
    ("long_prefix_cache_hit_no_affinity", None, "", ""),
    ("affinity_wall_ratio_long_prefix", 0.90, "<=", ""),
    ("enqueue_1m_s", 20, "<=", ""),
    ("redis_mib_1m", 256, "<=", ""),
    ("enqueue_rss_mib_1m", 256, "<=", ""),
    ("admit_backlog_rss_mib", 1024, "<=", ""),
    ("admit_backlog_steps_per_s", None, "", ""),
    ("follow_inflight_after_drain", 0, "<=", ""),
    ("gpu_cord_vs_curation_ratio", 1.10, "<=", "1.72"),
    ("gpu_cord_vs_curation_ratio_per_correct", 0.85, "<=", ""),
    ("gpu_teacher_util_cord", None, "", ""),
    ("gpu_teacher_util_curation", None, "", ""),
    ("gpu_teacher_util_ratio", 0.9, ">=", ""),
    ("gpu_barrier_idle_share", 0.10, "<=", ""),
    ("gpu_evicted_prefill_share", None, "", ""),
    ("gpu_fleet_overhead_share_cord", 0.10, "<=", ""),
    ("gpu_step_tail_share_cord", None, "", ""),
    ("gpu_step_slowest_over_mean_cord", None, "", ""),
    ("gpu_cord_vs_curation_ratio_before", None, "", ""),
    ("gpu_cord_vs_curation_ratio_per_correct_before", None, "", ""),
    ("gpu_teacher_util_cord_before", None, "", ""),
    ("gpu_barrier_idle_share_before", None, "", ""),
    ("gpu_evicted_prefill_share_before", None, "", ""),
    ("gpu_meta_teacher_cord_vs_curation_ratio", None, "", ""),
    ("gpu_7b_a10g_cord_vs_curation_ratio", None, "", ""),
    ("cord_vs_curation_wall_ratio_sim", None, "", ""),
    ("cord_vs_curation_model_token_ratio_sim", None, "", ""),
    ("sim_cpu_vllm_prediction_error", 0.15, "<=", ""),
    ("follow_coordinator_rss_mib_first_wave", None, "", ""),
    ("follow_coordinator_rss_mib_last_wave", None, "", ""),
]
HEADLINE = [name for name, *_ in TARGETS]


def machine_line(info: dict[str, Any]) -> str:
    load = ", ".join(f"{x:g}" for x in info.get("load_avg_1_5_15", []))
    return (
        f"{info.get('cores')} cores, {info.get('cpu')}, load average {load} (1, 5, 15 min), "
        f"Python {info.get('python')}, torch {info.get('torch', '-')}"
    )


# Each benchmark: its script and subcommand (None: the script is one command).
SCRIPTS: dict[str, tuple[Path, str | None]] = {
    "dispatch": (FLEET, "dispatch"),
    "overhead": (FLEET, "overhead"),
    "cache": (FLEET, "cache"),
    "vllm_pairs": (HERE / "servers.py", "pairs"),
    "vllm_affinity": (HERE / "servers.py", "affinity"),
    "soak": (FLEET, "soak"),
    "memory": (FLEET, "memory"),
    "backlog": (HERE / "backlog.py", None),
    "gpu_costs": (HERE / "costs.py", "gpu"),
}


def run_one(name: str, args: list[str], redis_url: str | None) -> dict[str, Any] | None:
    """One benchmark in its own process; its figures, or None when it failed."""
    with tempfile.TemporaryDirectory(prefix="cord-bench-") as tmp:
        out = Path(tmp) / "figures.json"
        script, command = SCRIPTS[name]
        cmd = [sys.executable, str(script), *([command] if command else [])]
        cmd += [*args, "--json", str(out)]
        if redis_url:
            cmd += ["--redis-url", redis_url]
        click.echo(f"\n== {name}: {shlex.join(cmd[1:])}", err=True)
        start = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT)
        click.echo(
            f"== {name}: exit {done.returncode} in {time.monotonic() - start:.0f}s", err=True
        )
        if done.returncode != 0 or not out.exists():
            return None
        figures: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
        figures[f"{name}_bench_s"] = round(time.monotonic() - start, 1)
        return figures


def verdict(value: Any, target: float | None, sense: str) -> str:
    if target is None or not isinstance(value, int | float):
        return ""
    ok = value >= target if sense == ">=" else value <= target
    return "met" if ok else "missed"


def table(figures: dict[str, Any]) -> list[str]:
    lines = ["| figure | value | target | paper | |", "|---|---|---|---|---|"]
    for name, target, sense, paper in TARGETS:
        value = figures.get(name, "not run")
        goal = f"{sense} {target:g}" if target is not None else ""
        lines.append(f"| `{name}` | {value} | {goal} | {paper} | {verdict(value, target, sense)} |")
    return lines


def details(results: dict[str, dict[str, Any] | None]) -> list[str]:
    lines = []
    for name, figures in results.items():
        if figures is None:
            lines.append(f"- `{name}`: FAILED (see the run's output)")
            continue
        shown = ", ".join(
            f"{k}={v}"
            for k, v in figures.items()
            if k not in HEADLINE and k != "machine" and not isinstance(v, dict | list)
        )
        lines.append(f"- `{name}`: {shown}")
    return lines


def name_values(figures: dict[str, Any]) -> list[str]:
    """Every figure once, the headline ones last (the lines scripts read)."""
    rest = [k for k in figures if k not in HEADLINE]
    order = [*rest, *[k for k in HEADLINE if k in figures]]
    return [
        f"{k}={figures[k]}"
        for k in order
        if isinstance(figures[k], int | float | str) and not isinstance(figures[k], bool)
    ]


def write_doc(path: Path, section: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


@click.command()
@click.option("--redis-url", default=None, help="Default: CORD_REDIS_URL or the local one.")
@click.option(
    "--only",
    default="dispatch,overhead,cache,vllm_pairs,vllm_affinity,gpu_costs,soak,memory,backlog",
    show_default=True,
    help="Comma-separated benchmarks to run.",
)
@click.option("--dispatch-problems", default=2000, show_default=True)
@click.option("--dispatch-in-flight", default=1000, show_default=True)
@click.option("--overhead-problems", default=48, show_default=True)
@click.option("--overhead-pairs", default=3, show_default=True)
@click.option("--cache-problems", default=24, show_default=True)
@click.option("--vllm-problems", default=12, show_default=True)
@click.option("--vllm-pairs-problems", default=48, show_default=True)
@click.option("--vllm-pairs", default=4, show_default=True)
@click.option("--vllm-sim-pairs", default=2, show_default=True)
@click.option("--affinity-problems", default=24, show_default=True)
@click.option("--affinity-lab-pairs", default=1, show_default=True)
@click.option("--affinity-long-problems", default=12, show_default=True)
@click.option("--affinity-long-pairs", default=2, show_default=True)
@click.option("--backlog-problems", default=1_000_000, show_default=True)
@click.option("--admit-seconds", default=45, show_default=True)
@click.option("--soak-waves", default=8, show_default=True)
@click.option("--memory-problems", default=10000, show_default=True)
@click.option("--gpu-problems", default=20, show_default=True)
@click.option("--gpu-side-problems", default=12, show_default=True)
@click.option("--gpu-sweep", default="8,16", show_default=True)
@click.option(
    "--doc",
    "doc_path",
    default=str(ROOT / "docs" / "benchmarks.md"),
    show_default=True,
    help="Markdown file whose make-bench section is rewritten.",
)
@click.option("--no-doc", is_flag=True, help="Print only; leave the docs alone.")
@click.option("--json", "json_path", default=None, help="Also write all figures here.")
def main(
    redis_url: str | None,
    only: str,
    doc_path: str,
    no_doc: bool,
    json_path: str | None,
    **sizes: Any,
) -> None:
    """Run the fleet benchmarks and write their figures (see the module docstring)."""
    sys.path.insert(0, str(HERE))
    from harness import machine  # the same description every benchmark records

    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    info = machine()
    click.echo(f"machine: {machine_line(info)}", err=True)
    plan = plan_of(sizes)
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = sorted(set(wanted) - set(plan))
    if unknown:
        raise click.BadParameter(f"unknown benchmarks {unknown}; use {list(plan)}")
    start = time.monotonic()
    results = {name: run_one(name, plan[name], redis_url) for name in plan if name in wanted}
    total = time.monotonic() - start
    figures: dict[str, Any] = {}
    for r in results.values():
        figures.update({k: v for k, v in (r or {}).items() if k != "machine"})
    figures["bench_total_s"] = round(total, 1)
    click.echo("\n" + "\n".join(table(figures)))
    if not no_doc:
        write_doc(Path(doc_path), section_of(started, info, total, figures, results))
        click.echo(f"\nwrote the make-bench section of {doc_path}", err=True)
    if json_path:
        Path(json_path).write_text(
            json.dumps({"machine": info, "figures": figures}, indent=2) + "\n", encoding="utf-8"
        )
    click.echo("")
    for line in name_values(figures):
        click.echo(line)
    if any(r is None for r in results.values()):
        sys.exit(1)


def plan_of(sizes: dict[str, Any]) -> dict[str, list[str]]:
    """Each benchmark's arguments, from the size options (`main`'s)."""

    def args(*pairs: tuple[str, str]) -> list[str]:
        return [x for flag, size in pairs for x in (flag, str(sizes[size]))]

    return {
        "dispatch": args(
            ("--problems", "dispatch_problems"), ("--max-in-flight", "dispatch_in_flight")
        ),
        "overhead": args(("--problems", "overhead_problems"), ("--pairs", "overhead_pairs")),
        "cache": args(("--problems", "cache_problems")),
        # The fleet on vLLM servers against hf, the same problems; CoRD against curation
        # with every pool on a vLLM server; then the sim engine, calibrated on those
        # servers, predicts the pairs (servers.py).
        "vllm_pairs": args(
            ("--compare-problems", "vllm_problems"),
            ("--problems", "vllm_pairs_problems"),
            ("--pairs", "vllm_pairs"),
            ("--sim-pairs", "vllm_sim_pairs"),
        ),
        # Two vLLM servers per pool: cache hits and wall time with and without affinity.
        "vllm_affinity": args(
            ("--problems", "affinity_problems"),
            ("--lab-pairs", "affinity_lab_pairs"),
            ("--long-problems", "affinity_long_problems"),
            ("--long-pairs", "affinity_long_pairs"),
        ),
        # A --follow coordinator while workers are stopped wave after wave.
        "soak": args(("--waves", "soak_waves")),
        "memory": args(("--problems", "memory_problems")),
        # CoRD against curation on simulated GPUs: what a dataset costs (costs.py).
        "gpu_costs": [
            *args(("--problems", "gpu_problems"), ("--side-problems", "gpu_side_problems")),
            *["--sweep", str(sizes["gpu_sweep"])],
        ],
        # Last: a million problems enqueued, and a coordinator drawing from them.
        "backlog": args(("--problems", "backlog_problems"), ("--admit-seconds", "admit_seconds")),
    }


def section_of(
    started: str,
    info: dict[str, Any],
    total: float,
    figures: dict[str, Any],
    results: dict[str, dict[str, Any] | None],
) -> str:
    """The make-bench section of docs/benchmarks.md: when, where, the command, the table
    against the targets, every figure of each benchmark and the name=value lines."""
    end_load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    command = (
        "make bench"
        if not sys.argv[1:]
        else "python ops/bench/run_all.py " + shlex.join(sys.argv[1:])
    )
    over = "" if total <= BUDGET_S else f" (over the {BUDGET_S // 60} min budget)"
    return "\n".join(
        [
            f"### Measured {started}",
            "",
            f"Machine: {machine_line(info)}; load average at the end {end_load}.",
            f"Command: `{command}`; {total / 60:.1f} min in all{over}.",
            "",
            *table(figures),
            "",
            "Every figure of each benchmark:",
            "",
            *details(results),
            "",
            "```",
            *name_values(figures),
            "```",
        ]
    )


if __name__ == "__main__":
    main()
