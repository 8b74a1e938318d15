"""``cord-coord report``: one static HTML page of plots about a run's traces.

`write_report` reads nothing but the rows (`rundir.RunDir`) and writes
``<out>/index.html`` with its PNGs beside it (relative links: the folder opens in a
browser from anywhere, nothing else running). Plots, drawn with matplotlib's Agg
renderer (no screen, no pyplot state):

- ``strategies.png``: accuracy and mean S per strategy (only for several strategies);
- ``score_right_wrong.png``: S of right and of wrong traces;
- ``step_teachers.png``: which teacher wrote the chosen step at each step index;
- ``tokens_per_teacher.png``: generated tokens per problem, per teacher;
- ``wall_time.png``: wall seconds per problem;
- ``students.png``: where the folder holds a ``students.json`` (`cord-lab student`
  writes it beside the rows it evaluated), each distilled student's accuracy against
  its training tokens, beside the teachers alone; the page adds its table.

Each plot comes back as a `Plot` holding the numbers it drew and the colour of each
series, so a test can check the picture against the rows.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pydantic import BaseModel, ConfigDict

from cord.coordinator.rows import Summary, auroc, summarize
from cord.coordinator.rundir import RunDir

# Fixed colours: teachers in the order they are met, strategies likewise.
TEACHER_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
STRATEGY_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
RIGHT, WRONG = "#2ca02c", "#d62728"
ACCURACY, MEAN_S = "#4c72b0", "#dd8452"
DPI = 100
FEW = 20  # right (or wrong) traces below which an AUROC is a hint, not a figure


# -- students (`cord-lab student`) ------------------------------------------------------
STUDENTS_FILE = "students.json"


class TeacherFigures(BaseModel):
    """A model alone on the held-out problems: accuracy and its 95% interval."""

    model_config = ConfigDict(extra="forbid")
    accuracy: float
    ci: tuple[float, float]


class StudentFigures(TeacherFigures):
    tokens: int  # training tokens: the completion tokens of its set, times the epochs
    rows: int  # training rows, after the cut to the common budget
    seeds: list[float]  # accuracy of each training seed's student
    train_s: float
    eval_s: float


class SetFigures(BaseModel):
    """A training set as exported, before the cut: how many rows, the share whose answer
    is right, and the share whose every step is sound (the process, not just the answer;
    the lab's task can check each step)."""

    model_config = ConfigDict(extra="forbid")
    rows: int
    correct: float
    sound: float  # every step a right rewrite of the line before
    step_sound: float  # of all steps
    correct_unsound: float  # of the right rows, those with a wrong step


class Students(BaseModel):
    """What `cord-lab student` found: students by training set (``none``, ``cord``,
    ``curation``, ``single:<teacher>``, each also ``+correct``), teachers by name."""

    model_config = ConfigDict(extra="forbid")
    students: dict[str, StudentFigures]
    teachers: dict[str, TeacherFigures]
    sets: dict[str, SetFigures]
    best_single: str  # the teacher most often right on the training problems
    train_problems: int
    train_seed: int
    eval_problems: int
    eval_seed: int
    seeds: int
    budget_tokens: int  # each set's completion tokens after the cut
    epochs: int


def read_students(run: RunDir) -> Students | None:
    path = run.path / STUDENTS_FILE
    return Students.model_validate_json(path.read_text(encoding="utf-8")) if path.exists() else None


@dataclass
class Plot:
    name: str  # the PNG's file name, without .png
    title: str
    caption: str
    data: dict[str, Any]  # what was drawn
    colors: dict[str, str] = field(default_factory=dict)  # series -> colour

    @property
    def file(self) -> str:
        return f"{self.name}.png"


@dataclass
class Report:
    index: Path
    plots: list[Plot]
    summary: dict[str, Summary]  # by strategy, and "all" when there are several


def teachers_of(run: RunDir) -> list[str]:
    """Teachers in the order the rows' configs list them, then any other that wrote."""
    seen: dict[str, None] = {}
    for row in run.traces:
        for name in row.models.teachers:
            seen.setdefault(name, None)
    for row in run.traces:
        for name in (*row.teachers, *row.stats.tokens_by_teacher):
            seen.setdefault(name, None)
    return list(seen)


def _palette(names: list[str], colors: list[str]) -> dict[str, str]:
    return {n: colors[i % len(colors)] for i, n in enumerate(names)}


def summaries(run: RunDir) -> dict[str, Summary]:
    """One summary per strategy (`rows.summarize`), and one of all of them when there are
    several."""
    out = {r.strategy: summarize(r.traces, r.failed) for r in run.runs}
    if len(run.runs) > 1:
        out["all"] = summarize(run.traces, run.failed)
    return out


# -- plots ---------------------------------------------------------------------------
def _grid(n: int, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list[Axes]]:
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = [ax for line in axes for ax in line]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot_strategies(run: RunDir, path: Path) -> Plot | None:
    """Accuracy and mean S per strategy, side by side; None for a single strategy."""
    if len(run.runs) < 2:
        return None
    lines = {r.strategy: summarize(r.traces, r.failed) for r in run.runs}
    names = list(lines)
    accuracy = {n: lines[n].accuracy or 0.0 for n in names}
    mean_s = {n: lines[n].mean_score or 0.0 for n in names}
    fig = Figure(figsize=(max(8.0, 1.6 * len(names)), 3.8), dpi=DPI, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for ax, values, color, label in (
        (ax1, accuracy, ACCURACY, "accuracy"),
        (ax2, mean_s, MEAN_S, "mean S"),
    ):
        bars = ax.bar(names, [values[n] for n in names], color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(0, max(1.0, *values.values()) * 1.1)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax1.set_title("accuracy (failures count as wrong)")
    ax2.set_title("mean S of the traces")
    fig.savefig(path)
    return Plot(
        "strategies",
        "Accuracy and mean S per strategy",
        "Accuracy: traces whose final answer matches the reference, over all problems "
        "of the strategy. S: the meta-prover's score of the chosen trajectory.",
        {"accuracy": accuracy, "mean_score": mean_s},
        {"accuracy": ACCURACY, "mean_score": MEAN_S},
    )


def plot_score_right_wrong(run: RunDir, path: Path) -> Plot:
    """Histograms of S, right traces beside wrong ones (all strategies)."""
    right = [r.score for r in run.traces if r.right]
    wrong = [r.score for r in run.traces if not r.right]
    series = [(k, v, c) for k, v, c in (("right", right, RIGHT), ("wrong", wrong, WRONG)) if v]
    every = right + wrong
    lo, hi = min(0.0, *every), max(1.0, *every)
    fig = Figure(figsize=(8, 3.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.hist(
        [v for _, v, _ in series],
        bins=[lo + (hi - lo) * i / 20 for i in range(21)],
        color=[c for _, _, c in series],
        label=[f"{k} ({len(v)})" for k, v, _ in series],
    )
    ax.set_xlabel("S of the trace")
    ax.set_ylabel("traces")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    area = auroc(right, wrong)
    counts = f"{len(right)} right, {len(wrong)} wrong"
    shown = f"AUROC {area:.3f}; {counts}" if area is not None else counts
    ax.set_title(f"S of right and wrong traces ({shown})")
    ax.legend()
    fig.savefig(path)
    return Plot(
        "score_right_wrong",
        "S of right and wrong traces",
        "How well S separates traces whose final answer is right from those whose answer "
        "is wrong (all strategies together); AUROC: the chance that a right trace scores "
        f"above a wrong one. With fewer than {FEW} of either, one trace moves it by "
        "tenths: read it as a hint.",
        {"right": right, "wrong": wrong, "auroc": area},
        {"right": RIGHT, "wrong": WRONG},
    )


def plot_step_teachers(run: RunDir, path: Path) -> Plot:
    """Stacked bars per strategy: at each step index, how many traces have their chosen
    step there written by each teacher."""
    teachers = teachers_of(run)
    colors = _palette(teachers, TEACHER_COLORS)
    data: dict[str, dict[str, list[int]]] = {}
    for r in run.runs:
        depth = max((len(row.steps) for row in r.traces), default=0)
        counts = {t: [0] * depth for t in teachers}
        for row in r.traces:
            for i, teacher in enumerate(row.teachers):
                counts[teacher][i] += 1
        data[r.strategy] = counts
    fig, axes = _grid(len(data))
    for ax, (strategy, counts) in zip(axes, data.items(), strict=True):
        index = list(range(1, 1 + max((len(c) for c in counts.values()), default=0)))
        bottom = [0] * len(index)
        for t in teachers:
            if any(counts[t]):
                ax.bar(index, counts[t], bottom=bottom, color=colors[t], label=t, width=0.85)
                bottom = [b + c for b, c in zip(bottom, counts[t], strict=True)]
        ax.set_title(strategy)
        ax.set_xlabel("step index")
        ax.set_ylabel("traces")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.savefig(path)
    return Plot(
        "step_teachers",
        "Which teacher wrote the chosen step",
        "For each step index of the chosen trajectories: how many were written by each "
        "teacher (traces end at different depths, so the bars shrink).",
        data,
        colors,
    )


def plot_tokens_per_teacher(run: RunDir, path: Path) -> Plot:
    """Box plots per strategy: tokens each teacher generated per problem (kept,
    discarded and answers alike)."""
    teachers = teachers_of(run)
    colors = _palette(teachers, TEACHER_COLORS)
    data: dict[str, dict[str, list[int]]] = {}
    for r in run.runs:
        by_teacher = [row.stats.tokens_by_teacher for row in r.traces]
        used = [t for t in teachers if any(t in tokens for tokens in by_teacher)]
        data[r.strategy] = {t: [tokens.get(t, 0) for tokens in by_teacher] for t in used}
    fig, axes = _grid(len(data))
    for ax, (strategy, per_teacher) in zip(axes, data.items(), strict=True):
        names = list(per_teacher)
        if names:
            boxes = ax.boxplot(
                [per_teacher[t] for t in names],
                tick_labels=names,
                patch_artist=True,
                widths=0.6,
                medianprops={"color": "black"},
            )
            for patch, t in zip(boxes["boxes"], names, strict=True):
                patch.set_facecolor(colors[t])
        ax.set_title(strategy)
        ax.set_ylabel("generated tokens per problem")
        ax.set_ylim(bottom=0)
    fig.savefig(path)
    return Plot(
        "tokens_per_teacher",
        "Generated tokens per problem, per teacher",
        "Every token a teacher generated for a problem: steps kept and discarded, and "
        "final answers (stats.tokens_by_teacher).",
        data,
        colors,
    )


def plot_wall_time(run: RunDir, path: Path) -> Plot:
    """Histogram of wall seconds per problem, one series per strategy."""
    data = {r.strategy: [row.stats.wall_s for row in r.traces] for r in run.runs}
    colors = _palette(list(data), STRATEGY_COLORS)
    series = [(s, v) for s, v in data.items() if v]
    fig = Figure(figsize=(8, 3.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.hist(
        [v for _, v in series],
        bins=15,
        color=[colors[s] for s, _ in series],
        label=[f"{s} (mean {sum(v) / len(v):.1f} s)" for s, v in series],
    )
    ax.set_xlabel("wall seconds per problem (stats.wall_s)")
    ax.set_ylabel("problems")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.savefig(path)
    return Plot(
        "wall_time",
        "Time per problem",
        "Wall seconds from a problem's first work to its row (stats.wall_s); problems of "
        "one run share the fleet, so these overlap.",
        data,
        colors,
    )


def plot_students(run: RunDir, path: Path) -> Plot | None:
    """Each student's accuracy (95% interval) against its training tokens; the teachers
    alone as lines. None without a ``students.json``."""
    found = read_students(run)
    if found is None:
        return None
    fig = Figure(figsize=(8.0, 4.6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    names = list(found.students)
    colors = _palette(names, STRATEGY_COLORS)
    # Sets trained on one budget sit at one x: each is nudged sideways to stay readable
    # (the untrained student stays at 0).
    nudge = 0.015 * max([f.tokens for f in found.students.values()] + [1])
    for i, (name, f) in enumerate(found.students.items()):
        err = [[f.accuracy - f.ci[0]], [f.ci[1] - f.accuracy]]
        marker = "s" if name.endswith("+correct") else "o"
        ax.errorbar(
            [f.tokens + (i - len(names) / 2) * nudge if f.tokens else 0],
            [f.accuracy],
            yerr=err,
            fmt=marker,
            color=colors[name],
            label=name,
            capsize=3,
        )
    for i, (name, t) in enumerate(found.teachers.items()):
        color = TEACHER_COLORS[i % len(TEACHER_COLORS)]
        ax.axhline(t.accuracy, color=color, linestyle="--", linewidth=1)
        ax.annotate(
            f"{name} alone",
            (0, t.accuracy),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            color=color,
            va="bottom",
        )
    ax.set_xlabel("training tokens")
    ax.set_ylabel("accuracy on held-out problems")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path)
    return Plot(
        "students",
        "Students distilled from each strategy's traces",
        f"One student per training set, trained from the same weights on "
        f"{found.budget_tokens} completion tokens for {found.epochs} epochs ({found.seeds} "
        f"seed(s)); accuracy on {found.eval_problems} held-out problems with a 95% bootstrap "
        "interval. Squares: sets of correct traces only. Dashed: the teachers alone.",
        {
            n: {"tokens": f.tokens, "accuracy": f.accuracy, "ci": list(f.ci)}
            for n, f in found.students.items()
        },
        colors,
    )


PLOTS = (
    plot_students,
    plot_strategies,
    plot_score_right_wrong,
    plot_step_teachers,
    plot_tokens_per_teacher,
    plot_wall_time,
)


# -- the page ------------------------------------------------------------------------
def write_report(run: RunDir, out_dir: str | Path) -> Report:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = [p for p in (plot(run, out / f"{plot.__name__[5:]}.png") for plot in PLOTS) if p]
    summary = summaries(run)
    index = out / "index.html"
    index.write_text(render_html(run, plots, summary), encoding="utf-8")
    return Report(index, plots, summary)


def _cell(x: Any, spec: str = "") -> str:
    if x is None:
        return "–"
    return html.escape(format(x, spec) if spec else str(x))


def _students_table(found: Students | None) -> str:
    if found is None:
        return ""
    rows = "\n".join(
        f"<tr><td>{_cell(n)}</td><td>{f.accuracy:.3f}</td><td>{f.ci[0]:.3f}-{f.ci[1]:.3f}</td>"
        f"<td>{f.tokens}</td><td>{f.rows}</td><td>{f.train_s:.1f}</td></tr>"
        for n, f in found.students.items()
    )
    alone = "\n".join(
        f"<tr><td>{_cell(n)} alone</td><td>{t.accuracy:.3f}</td>"
        f"<td>{t.ci[0]:.3f}-{t.ci[1]:.3f}</td><td></td><td></td><td></td></tr>"
        for n, t in found.teachers.items()
    )
    sets = "\n".join(
        f"<tr><td>{_cell(n)}</td><td>{f.rows}</td><td>{f.correct:.3f}</td><td>{f.sound:.3f}</td>"
        f"<td>{f.step_sound:.3f}</td><td>{f.correct_unsound:.3f}</td></tr>"
        for n, f in found.sets.items()
    )
    return (
        "<h2>Students</h2>\n<table>\n<tr><th>student</th><th>accuracy</th><th>95% CI</th>"
        "<th>training tokens</th><th>rows</th><th>train s</th></tr>\n"
        f"{rows}\n{alone}\n</table>\n"
        "<table>\n<tr><th>training set</th><th>rows</th><th>correct</th><th>sound</th>"
        "<th>steps sound</th><th>right but unsound</th></tr>\n"
        f"{sets}\n</table>\n"
    )


def _few(s: Summary) -> str:
    """A word beside an AUROC of too few traces."""
    if s.auroc is None or s.traces >= FEW:
        return ""
    return f" (of {s.traces} traces: too few to trust)"


def render_html(run: RunDir, plots: list[Plot], summary: dict[str, Summary]) -> str:
    esc = html.escape
    title = f"cord report: {run.path.resolve().name}"
    head = (
        "<tr><th>strategy</th><th>problems</th><th>traces</th><th>failed</th>"
        "<th>accuracy</th><th>mean S</th><th>AUROC</th><th>generated tokens</th>"
        "<th>thinking tokens</th><th>wall s</th></tr>"
    )
    body = "\n".join(
        f"<tr><td>{_cell(name)}</td><td>{s.problems}</td><td>{s.traces}</td>"
        f"<td>{s.failed}</td><td>{_cell(s.accuracy, '.3f')}</td>"
        f"<td>{_cell(s.mean_score, '.4f')}</td><td>{_cell(s.auroc, '.3f')}{_few(s)}</td>"
        f"<td>{_cell(s.mean_generated_tokens, '.0f')}</td>"
        f"<td>{_cell(s.mean_thinking_tokens, '.0f')}</td>"
        f"<td>{_cell(s.mean_wall_s, '.1f')}</td></tr>"
        for name, s in summary.items()
    )
    figures = "\n".join(
        f'<section id="{esc(p.name)}">\n<h2>{esc(p.title)}</h2>\n'
        f'<img src="{esc(p.file)}" alt="{esc(p.title)}">\n<p>{esc(p.caption)}</p>\n</section>'
        for p in plots
    )
    students = _students_table(read_students(run))
    teachers = ", ".join(teachers_of(run))
    made = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; padding: 0 1.5em;
       max-width: 1500px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
p.meta, section p {{ color: #555; max-width: 60em; }}
</style>
</head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">Rows of <code>{esc(str(run.path))}</code>; teachers {esc(teachers)};
written {made}. Accuracy counts a failed problem as wrong; tokens and seconds are
means per problem.</p>
{students}<table>
{head}
{body}
</table>
{figures}
</body>
</html>
"""
