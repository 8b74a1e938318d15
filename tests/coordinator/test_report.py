"""`cord-coord report`: the page and its plots, from a real run, checked against the rows
they were drawn from; the page in headless Chromium."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread

from cord.coordinator.cli import main
from cord.coordinator.matching import judge
from cord.coordinator.report import FEW, Plot, Report, _few, write_report
from cord.coordinator.rows import Summary
from cord.coordinator.rundir import read_run_dir
from tests.conftest import chromium, needs_chromium
from tests.coordinator.conftest import EVAL_STRATEGIES
from tests.coordinator.test_export import raw_traces

pytestmark = [pytest.mark.redis, pytest.mark.slow]
PNG = b"\x89PNG\r\n\x1a\n"


def verdict(row: dict[str, Any]) -> bool:
    if isinstance(row.get("correct"), bool):
        return bool(row["correct"])
    return judge(row["final_answer"], row["reference_answer"]).correct


@pytest.fixture(scope="module")
def report(lab_eval: Path, tmp_path_factory: pytest.TempPathFactory) -> Report:
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(
        main, ["report", "--in", str(lab_eval), "--out", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'index.html'} with 5 plots" in result.output
    # the same report again, in process, for the numbers each plot drew
    return write_report(read_run_dir(lab_eval), out)


def pixels(png: Path, color: str, tol: float = 0.02) -> int:
    """How many pixels of `png` have the colour `color` (#rrggbb)."""
    img = imread(str(png))[..., :3]
    rgb = np.array([int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(axis=-1) < tol).sum())


def plot(report: Report, name: str) -> Plot:
    (found,) = [p for p in report.plots if p.name == name]
    return found


def test_the_page_links_every_plot(report):
    html = report.index.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert srcs == [p.file for p in report.plots]
    assert [p.name for p in report.plots] == [
        "strategies",
        "score_right_wrong",
        "step_teachers",
        "tokens_per_teacher",
        "wall_time",
    ]
    for src in srcs:
        assert "/" not in src and (report.index.parent / src).is_file()
    assert "<title>cord report: ev</title>" in html
    # the summary table: one line per strategy and one for all
    assert list(report.summary) == [*EVAL_STRATEGIES, "all"]


def test_every_png_is_valid_and_shows_its_data(report):
    for p in report.plots:
        path = report.index.parent / p.file
        assert path.read_bytes()[:8] == PNG, p.name
        img = imread(str(path))
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400, p.name
        # every series that has data is on the picture, in its colour
        drawn = {
            "strategies": lambda d, s: any(v > 0 for v in d[s].values()),
            "score_right_wrong": lambda d, s: bool(d[s]),
            "step_teachers": lambda d, s: any(sum(c.get(s, [])) for c in d.values()),
            "tokens_per_teacher": lambda d, s: any(
                np.percentile(v[s], 75) - np.percentile(v[s], 25) > 0.05 * max(v[s])
                for v in d.values()
                if s in v
            ),
            "wall_time": lambda d, s: bool(d[s]),
        }[p.name]
        shown = [s for s in p.colors if drawn(p.data, s)]
        assert shown, p.name
        for series in shown:
            assert pixels(path, p.colors[series]) > 100, (p.name, series)


def test_plotted_numbers_are_the_rows(lab_eval, report):
    traces = raw_traces(lab_eval)
    mine = {s: [t for t in traces if t["strategy"] == s] for s in EVAL_STRATEGIES}

    d = plot(report, "strategies").data
    for s, rows in mine.items():  # no failures in this run: problems = traces
        assert d["accuracy"][s] == pytest.approx(sum(map(verdict, rows)) / len(rows))
        assert d["mean_score"][s] == pytest.approx(sum(r["score"] for r in rows) / len(rows))

    d = plot(report, "score_right_wrong").data
    assert sorted(d["right"]) == sorted(t["score"] for t in traces if verdict(t))
    assert sorted(d["wrong"]) == sorted(t["score"] for t in traces if not verdict(t))

    d = plot(report, "step_teachers").data
    for s, rows in mine.items():
        want = Counter((i, st["teacher"]) for r in rows for i, st in enumerate(r["steps"]))
        got = Counter({(i, t): n for t, counts in d[s].items() for i, n in enumerate(counts) if n})
        assert got == want, s

    d = plot(report, "tokens_per_teacher").data
    for s, rows in mine.items():
        for teacher, values in d[s].items():
            assert values == [r["stats"]["tokens_by_teacher"].get(teacher, 0) for r in rows]
        assert set(d[s]) == {t for r in rows for t in r["stats"]["tokens_by_teacher"]}

    d = plot(report, "wall_time").data
    assert {s: sorted(v) for s, v in d.items()} == {
        s: sorted(r["stats"]["wall_s"] for r in rows) for s, rows in mine.items()
    }


def test_one_strategy_has_no_strategy_comparison(lab_eval, tmp_path):
    result = CliRunner().invoke(
        main, ["report", "--in", str(lab_eval / "cord"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "strategies.png").exists()
    html = (tmp_path / "index.html").read_text()
    assert re.findall(r'<img src="([^"]+)"', html) == [
        "score_right_wrong.png",
        "step_teachers.png",
        "tokens_per_teacher.png",
        "wall_time.png",
    ]
    assert html.count("<tr>") == 2  # the head and cord's line
    assert "1 strategy)" in result.output


def test_an_auroc_of_a_few_traces_says_so():
    def summary(traces: int) -> Summary:
        return Summary(
            problems=traces, traces=traces, failed=0, correct=traces // 2,
            accuracy=0.5, mean_score=0.5, auroc=0.75, mean_generated_tokens=None,
            mean_thinking_tokens=None, mean_steps=None, mean_wall_s=None,
            prompt_tokens=0, cached_prompt_tokens=0,
        )  # fmt: skip

    assert _few(summary(4)) == " (of 4 traces: too few to trust)"
    assert _few(summary(FEW)) == ""
    assert _few(summary(4).model_copy(update={"auroc": None})) == ""


@pytest.mark.browser
@needs_chromium
def test_the_page_opens_in_chromium(report, tmp_path):
    url = report.index.resolve().as_uri()
    dom = chromium(["--dump-dom"], url, tmp_path / "profile").stdout
    assert "<title>cord report: ev</title>" in dom
    assert re.findall(r'<img src="([^"]+)"', dom) == [p.file for p in report.plots]
    # The screenshot (the whole page: a tall window) shows the plots' own colours, so
    # the browser loaded and drew the PNGs beside the page.
    shot = tmp_path / "report.png"
    chromium([f"--screenshot={shot}"], url, tmp_path / "profile", window="1400,4200")
    assert shot.read_bytes()[:8] == PNG
    for name in ("step_teachers", "strategies"):
        p = plot(report, name)
        color = next(c for s, c in p.colors.items() if s in ("alpha", "accuracy"))
        assert pixels(shot, color) > 500, name
