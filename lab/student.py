"""``cord-lab student``: does the data teach? Students distilled from each strategy's
traces, compared on held-out problems.

    cord-lab student --start-workers                     # the defaults (make lab-student)
    cord-lab student --start-workers --seeds 3 --out data/student-full  # three seeds

1. **Data, as a user makes it.** The lab's problems on a training seed (any problem of
   the evaluation or demo sets is left out), run through the fleet once per strategy
   (`cord-coord eval`'s code): CoRD, curation (the best of N trajectories per problem by
   S, N matched to CoRD's tokens) and each teacher alone. The best single teacher is the
   one most often right *on the training problems*. Each training set is written by
   ``cord-coord export`` (a subprocess: the command users run), all traces and
   ``--correct-only``.
2. **Students, at equal budgets.** Every student starts from the same weights
   (``models/student``: GPT-2-style, its own tokenizer and Gemma's turn template, trained
   on the task's format with a weakness of its own) and is trained by TRL's
   `SFTTrainer` with the same settings (`SFT`). Each set is cut to the smallest set's
   training tokens (the completion tokens, in the student's tokenizer, that the loss is
   on): its rows in a seeded random order, kept while their tokens fit.
3. **Evaluation through the fleet.** Each student is a pool of its own (`hf` engine),
   run as ``single:<student>`` on the held-out problems beside the teachers alone.
   Accuracy with a 95% interval: a bootstrap over problems (of the mean over training
   seeds when there are several).

Written under ``--out``: ``problems/`` (train.jsonl, eval.jsonl), ``data/`` (the
strategies' rows on the training problems), ``sets/`` (the exports), ``students/``
(one HF model folder each), ``eval/`` (every evaluated pool's rows, and
``students.json``, which ``cord-coord report --in <out>/eval`` shows), ``logs/``.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cord.common import prompts
from cord.common.config import RunConfig, load_config
from cord.coordinator.evaluate import evaluate, run_strategy
from cord.coordinator.fleet import LocalFleet
from cord.coordinator.inputs.problems import Problem
from cord.coordinator.inputs.sources import write_records
from cord.coordinator.report import (
    STUDENTS_FILE,
    SetFigures,
    StudentFigures,
    Students,
    TeacherFigures,
)
from cord.coordinator.rows import TraceRow
from cord.lab.arith import held_out_terms, make_problems, terms_of, valid_steps
from cord.lab.tinymodels import STUDENT

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "models" / STUDENT
CORRECT = "+correct"  # the suffix of a --correct-only set's name
# What a run writes under --out, replaced by the next run.
OUTPUTS = ("problems", "data", "sets", "students", "eval", "logs", "run")
MARKER = ".cord-lab-student"


class StudentError(RuntimeError):
    """The experiment cannot go on; the message says why and what to change."""


@dataclass(frozen=True)
class SFT:
    """The students' training settings: the same for every set and seed."""

    epochs: int = 10
    batch: int = 8
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_length: int = 1024


@dataclass(frozen=True)
class TrainingSet:
    name: str  # cord, curation, single:<teacher>, each also +correct
    strategy: str
    correct_only: bool

    @property
    def slug(self) -> str:
        return self.name.replace(":", "-").replace("+", "-")


def training_sets(best_single: str) -> list[TrainingSet]:
    strategies = ["cord", "curation", f"single:{best_single}"]
    return [
        TrainingSet(s + (CORRECT if correct else ""), s, correct)
        for correct in (False, True)
        for s in strategies
    ]


def split_problems(
    train_seed: int, train_n: int, eval_seed: int, eval_n: int
) -> tuple[list[Problem], list[Problem]]:
    """`train_n` training problems on `train_seed`, none of them in the evaluation set or
    the lab's held-out sets; `eval_n` evaluation problems on `eval_seed`."""
    evaluation = make_problems(eval_n, eval_seed)
    held = [Problem(**p.to_json()) for p in evaluation]
    unseen = held_out_terms() | {p.terms for p in evaluation}
    train: list[Problem] = []
    stream = make_problems(train_n * 2 + 100, train_seed)
    for p in stream:
        if p.terms not in unseen:
            train.append(Problem(**p.to_json()))
        if len(train) == train_n:
            break
    return train, held


def export_set(data_dir: Path, ts: TrainingSet, out: Path, log: Path) -> Path:
    """The set, written by ``cord-coord export`` as a user writes it."""
    path = out / f"{ts.slug}.jsonl"
    args = [sys.executable, "-m", "cord.coordinator.cli", "export", "--in", str(data_dir)]
    args += ["--strategy", ts.strategy, "--out", str(path), "--force"]
    args += ["--correct-only"] if ts.correct_only else []
    with open(log, "a", encoding="utf-8") as f:
        f.write("$ " + " ".join(args[2:]) + "\n")
        f.flush()
        subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, check=True)
    return path


# -- training ------------------------------------------------------------------------------
def completion_tokens(tok: Any, row: dict[str, Any]) -> int:
    """The tokens the loss is on: prompt+completion under the student's chat template,
    less the prompt with its generation prompt (as SFTTrainer splits them)."""
    prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
    whole = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
    return len(_ids(whole)) - len(_ids(prompt))


def _ids(rendered: Any) -> list[int]:
    """`apply_chat_template(tokenize=True)`'s ids, a list or a BatchEncoding by version."""
    return list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)


def set_figures(rows: list[dict[str, Any]]) -> SetFigures:
    """What a set teaches besides its answers: whether each row's steps are sound."""
    right = sound = right_unsound = steps_ok = steps = 0
    for row in rows:
        content = row["completion"][0]["content"]
        lines = [line for line in content.split("\n") if line.startswith(prompts.STEP_PREFIX)]
        ok = valid_steps(terms_of(row["question"]), lines)
        steps_ok, steps = steps_ok + ok, steps + len(lines)
        sound += ok == len(lines)
        right += bool(row["correct"])
        right_unsound += bool(row["correct"]) and ok < len(lines)
    n = max(1, len(rows))
    return SetFigures(
        rows=len(rows),
        correct=round(right / n, 4),
        sound=round(sound / n, 4),
        step_sound=round(steps_ok / max(1, steps), 4),
        correct_unsound=round(right_unsound / max(1, right), 4),
    )


def cut_to_budget(
    rows: list[dict[str, Any]], tokens: list[int], budget: int, seed: int
) -> tuple[list[dict[str, Any]], int]:
    """The rows, in a seeded random order, kept while their tokens fit in `budget`; and
    the tokens kept."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    kept, total = [], 0
    for i in order:
        if total + tokens[i] > budget:
            continue
        kept.append(rows[i])
        total += tokens[i]
    return kept, total


@dataclass
class Trained:
    path: Path
    rows: int
    tokens: int  # completion tokens per epoch
    train_s: float


def train_student(
    rows: list[dict[str, Any]], out: Path, seed: int, sft: SFT, base: Path = BASE
) -> tuple[int, float]:
    """A student from `base` trained by TRL's SFTTrainer on `rows` (prompt/completion), saved
    to `out` in HF format: its optimizer steps and seconds."""
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    data = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    )
    args = SFTConfig(
        output_dir=str(out / "trainer"),
        num_train_epochs=sft.epochs,
        per_device_train_batch_size=sft.batch,
        learning_rate=sft.lr,
        lr_scheduler_type="cosine",
        warmup_steps=sft.warmup_ratio,  # a float under 1: a share of the steps
        weight_decay=sft.weight_decay,
        max_length=sft.max_length,
        seed=seed,
        data_seed=seed,
        save_strategy="no",
        report_to="none",
        logging_steps=10,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    start = time.monotonic()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.remove_callback(PrinterCallback)  # its loss lines would bury the table
    result = trainer.train()
    wall = time.monotonic() - start
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    (out / "sft.json").write_text(
        json.dumps({"seed": seed, "rows": len(rows), "loss": result.training_loss, **vars(sft)})
        + "\n",
        encoding="utf-8",
    )
    return int(result.global_step), wall


# -- evaluation ----------------------------------------------------------------------------
def per_problem(rows: Sequence[TraceRow], problems: Sequence[Problem]) -> list[bool]:
    """Right or not, per problem in `problems`' order (no trace: a failure, wrong)."""
    right = {r.id: r.right for r in rows}
    return [right.get(p.id, False) for p in problems]


def bootstrap(
    runs: Sequence[Sequence[bool]], draws: int = 2000, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """Accuracy (the mean over `runs`, one per training seed, each a verdict per problem)
    and its 95% interval from a bootstrap over problems."""
    n = len(runs[0])
    per = [sum(run[i] for run in runs) / len(runs) for i in range(n)]
    rng = random.Random(seed)
    means = sorted(sum(per[rng.randrange(n)] for _ in range(n)) / n for _ in range(draws))
    return sum(per) / n, (means[int(0.025 * draws)], means[int(0.975 * draws) - 1])


def pool_name(ts_name: str | None, seed: int) -> str:
    """A student's pool: `student-none`, `student-cord-correct-s1`, ..."""
    slug = "none" if ts_name is None else TrainingSet(ts_name, "", False).slug
    return f"{STUDENT}-{slug}" + (f"-s{seed}" if seed else "")


def student_config(cfg: RunConfig, students: dict[str, Path], path: Path) -> RunConfig:
    """The run config with each student as one more teacher (same Redis, namespace and
    queues, so the running meta-prover scores them), written to `path`."""
    data = cfg.model_dump(mode="json", exclude_unset=True)
    data["teachers"] = [
        *data["teachers"],
        *({"name": n, "model": str(p)} for n, p in students.items()),
    ]
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_config(path)


# -- the experiment ------------------------------------------------------------------------
@dataclass
class Options:
    config: Path
    train_seed: int
    train_problems: int
    eval_seed: int
    eval_problems: int
    seeds: int
    start_workers: bool
    out: Path
    sft: SFT
    base: Path = BASE


def fresh_out(out: Path) -> None:
    """Empty the folders an earlier run wrote under `out` (a coordinator would take rows
    left there for its own); a folder that holds anything else is refused."""
    marker = out / MARKER
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise StudentError(f"--out {out} holds files of something else; name a new folder")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by cord-lab student; its next run replaces this folder\n")
    for sub in OUTPUTS:
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir()


def run(opts: Options, echo: Callable[[str], None]) -> Students:
    cfg = load_config(opts.config)
    out = opts.out
    fresh_out(out)
    train, held = split_problems(
        opts.train_seed, opts.train_problems, opts.eval_seed, opts.eval_problems
    )
    for name, problems in (("train", train), ("eval", held)):
        write_records(
            [p.model_dump(exclude={"meta"}) for p in problems], out / "problems" / f"{name}.jsonl"
        )
    teachers = list(cfg.teacher_names)
    with contextlib.ExitStack() as stack:
        fleet: LocalFleet | None = None
        if opts.start_workers:
            fleet = stack.enter_context(LocalFleet(opts.config, out / "run", cfg=cfg, echo=echo))
            fleet.up()
        # 1. the training data, and the teachers alone on the held-out problems
        start = time.monotonic()
        echo(f"data: {', '.join(['cord', 'curation', *teachers])} on {len(train)} problems")
        made = evaluate(
            cfg, train, ["cord", "curation", *(f"single:{t}" for t in teachers)], out / "data"
        )
        accuracy = {t: made["strategies"][f"single:{t}"]["accuracy"] or 0.0 for t in teachers}
        best = max(teachers, key=lambda t: accuracy[t])
        echo(
            f"data: {time.monotonic() - start:.0f}s; best single teacher on the training "
            f"problems: {best} ({accuracy[best]:.3f})"
        )
        tag = uuid.uuid4().hex[:8]
        teacher_runs = {
            t: run_strategy(cfg, f"single:{t}", held, out / "eval", tag) for t in teachers
        }
        # 2. the sets, cut to one budget, and the students
        sets = training_sets(best)
        students, budget, set_figs = train_all(opts, sets, echo)
        # 3. every student through the fleet
        scfg = student_config(cfg, {n: t.path for n, t in students.items()}, out / "students.yaml")
        redis = fleet.redis if fleet is not None else None
        sfleet = stack.enter_context(
            LocalFleet(out / "students.yaml", out / "run", cfg=scfg, local_redis=redis, echo=echo)
        )
        for name in students:
            sfleet.start_worker(name)
        sfleet.wait_ready()
        echo(f"eval: {len(students)} students and {len(teachers)} teachers on {len(held)} problems")
        student_runs = {
            n: run_strategy(scfg, f"single:{n}", held, out / "eval", tag) for n in students
        }
    return tabulate(opts, sets, set_figs, students, budget, teacher_runs, student_runs, held, best)


def train_all(
    opts: Options, sets: list[TrainingSet], echo: Callable[[str], None]
) -> tuple[dict[str, Trained], int, dict[str, SetFigures]]:
    """Export every set, cut each to the smallest set's tokens, and train one student per
    set and seed (and keep the base as the `none` student): by pool name."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(opts.base)
    log = opts.out / "logs" / "export.log"
    log.write_text("", encoding="utf-8")
    loaded: dict[str, tuple[list[dict[str, Any]], list[int]]] = {}
    for ts in sets:
        path = export_set(opts.out / "data", ts, opts.out / "sets", log)
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        loaded[ts.name] = rows, [completion_tokens(tok, r) for r in rows]
    empty = [name for name, (rows, _) in loaded.items() if not rows]
    if empty:
        raise StudentError(
            f"no training rows in {', '.join(empty)} (see {log}): give more --train-problems"
        )
    budget = min(sum(tokens) for _, tokens in loaded.values())
    echo(f"sets: cut to {budget} training tokens each (the smallest set's)")
    figures = {name: set_figures(rows) for name, (rows, _) in loaded.items()}
    students: dict[str, Trained] = {
        pool_name(None, 0): Trained(opts.base, 0, 0, 0.0),
    }
    for seed in range(opts.seeds):
        for ts in sets:
            rows, tokens = loaded[ts.name]
            kept, total = cut_to_budget(rows, tokens, budget, opts.train_seed + seed)
            name = pool_name(ts.name, seed)
            steps, wall = train_student(
                kept, opts.out / "students" / name, seed, opts.sft, opts.base
            )
            echo(
                f"student {name}: {len(kept)} of {len(rows)} rows, {total} tokens, "
                f"{steps} steps, {wall:.0f}s"
            )
            students[name] = Trained(opts.out / "students" / name, len(kept), total, wall)
    return students, budget, figures


def tabulate(
    opts: Options,
    sets: list[TrainingSet],
    set_figs: dict[str, SetFigures],
    students: dict[str, Trained],
    budget: int,
    teacher_runs: dict[str, Any],
    student_runs: dict[str, Any],
    held: list[Problem],
    best: str,
) -> Students:
    def figures(names: list[str]) -> StudentFigures:
        runs = [per_problem(student_runs[n].rows, held) for n in names]
        accuracy, ci = bootstrap(runs)
        trained = [students[n] for n in names]
        return StudentFigures(
            accuracy=round(accuracy, 4),
            ci=(round(ci[0], 4), round(ci[1], 4)),
            tokens=round(sum(t.tokens for t in trained) / len(trained)) * opts.sft.epochs,
            rows=round(sum(t.rows for t in trained) / len(trained)),
            seeds=[round(sum(r) / len(r), 4) for r in runs],
            train_s=round(sum(t.train_s for t in trained), 1),
            eval_s=round(sum(student_runs[n].wall_s for n in names), 1),
        )

    table = {"none": figures([pool_name(None, 0)])}
    for ts in sets:
        table[ts.name] = figures([pool_name(ts.name, s) for s in range(opts.seeds)])
    teachers = {}
    for t, result in teacher_runs.items():
        accuracy, ci = bootstrap([per_problem(result.rows, held)])
        teachers[t] = TeacherFigures(
            accuracy=round(accuracy, 4), ci=(round(ci[0], 4), round(ci[1], 4))
        )
    return Students(
        students=table,
        teachers=teachers,
        sets=set_figs,
        best_single=best,
        train_problems=opts.train_problems,
        train_seed=opts.train_seed,
        eval_problems=len(held),
        eval_seed=opts.eval_seed,
        seeds=opts.seeds,
        budget_tokens=budget,
        epochs=opts.sft.epochs,
    )


def format_table(result: Students) -> str:
    head = (
        f"{'student':<24} {'accuracy':>8} {'95% CI':>15} {'tokens':>8} {'rows':>5} "
        f"{'train s':>8} {'eval s':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, f in result.students.items():
        ci = f"{f.ci[0]:.3f}-{f.ci[1]:.3f}"
        lines.append(
            f"{name:<24} {f.accuracy:>8.3f} {ci:>15} {f.tokens:>8} {f.rows:>5} "
            f"{f.train_s:>8.1f} {f.eval_s:>7.1f}"
        )
    lines.append("")
    lines.append(f"{'teacher alone':<24} {'accuracy':>8} {'95% CI':>15}")
    for name, t in result.teachers.items():
        ci = f"{t.ci[0]:.3f}-{t.ci[1]:.3f}"
        lines.append(f"{name:<24} {t.accuracy:>8.3f} {ci:>15}")
    lines.append("")
    lines.append(
        f"{'training set':<24} {'rows':>5} {'correct':>8} {'sound':>6} {'steps ok':>8} "
        f"{'right, unsound':>14}"
    )
    for name, f2 in result.sets.items():
        lines.append(
            f"{name:<24} {f2.rows:>5} {f2.correct:>8.3f} {f2.sound:>6.3f} {f2.step_sound:>8.3f} "
            f"{f2.correct_unsound:>14.3f}"
        )
    lines.append(
        f"{result.eval_problems} held-out problems (seed {result.eval_seed}); students trained on "
        f"{result.train_problems} problems (seed {result.train_seed}), {result.seeds} seed(s), "
        f"{result.epochs} epochs of {result.budget_tokens} tokens; best single teacher on the "
        f"training problems: {result.best_single}"
    )
    return "\n".join(lines)


def save(result: Students, out: Path, json_path: Path | None) -> None:
    text = result.model_dump_json(indent=2) + "\n"
    (out / "eval" / STUDENTS_FILE).write_text(text, encoding="utf-8")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text, encoding="utf-8")
