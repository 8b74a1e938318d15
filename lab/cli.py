"""``cord-lab``: the lab's tools, apart from the fleet's.

    cord-lab problems --n 20 --seed 1000 [--like gsm8k|math] [--out FILE]
    cord-lab train --out models [--only alpha] [--scale 0.2]
    cord-lab student --start-workers [--train-problems 1000] [--seeds 3] [--json FILE]

`problems` writes arithmetic problems the bundled models can solve (as cord's own input,
or shaped as GSM8K and MATH write theirs, to try `enqueue`'s field mapping); `train`
trains the bundled models again (`cord.lab.train`, about 40 minutes on 2 cores);
`student` distills each strategy's traces into a student and compares them
(`cord.lab.student`, docs/lab.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import click

from cord.lab.arith import SHAPES, make_problems


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The lab: problems with checkable answers and the tiny models that solve them."""


@main.command()
@click.option("--n", "count", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=1000, show_default=True)
@click.option(
    "--like",
    type=click.Choice(SHAPES),
    default="cord",
    show_default=True,
    help="Fields as cord's own input (id, question, answer), GSM8K or MATH write them.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write a .jsonl, .json, .csv or .parquet file instead of JSONL to stdout.",
)
def problems(count: int, seed: int, like: str, out_path: str | None) -> None:
    """Write N lab arithmetic problems (the bundled models can solve them), as JSONL to
    stdout or to a file in the format --out names; --like gsm8k|math shapes them as
    those datasets do, to try enqueue's field mapping."""
    from cord.coordinator.inputs.sources import SourceError, write_records

    rows = [p.shaped(cast(Any, like)) for p in make_problems(count, seed)]
    if out_path is None:
        for row in rows:
            click.echo(json.dumps(row))
        return
    try:
        write_records(rows, Path(out_path))
    except SourceError as e:
        raise click.BadParameter(str(e), param_hint="--out") from e
    click.echo(f"wrote {len(rows)} problems ({like}) to {out_path}", err=True)


@main.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train(args: tuple[str, ...]) -> None:
    """Train the bundled models again (`cord-lab train --help` for the options)."""
    from cord.lab.train import main as train_main  # torch: only when training

    train_main.main(args=list(args), prog_name="cord-lab train")


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=Path("examples/demo.yaml"),
    show_default=True,
    help="The fleet that makes the data: teachers and meta-prover.",
)
@click.option("--train-seed", type=int, default=1234, show_default=True)
@click.option("--train-problems", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--eval-seed",
    type=int,
    default=7,
    show_default=True,
    help="7: the lab's held-out set, never trained on by any bundled model.",
)
@click.option("--eval-problems", type=click.IntRange(min=1), default=300, show_default=True)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Training seeds per set (the interval is then over problems and seeds).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="SFT epochs (default: the lab's, cord.lab.student.SFT).",
)
@click.option(
    "--start-workers",
    is_flag=True,
    help="Start Redis (if none answers) and the config's workers; without it they must run.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("data/student"),
    show_default=True,
    help="Rows, sets, students and figures; what an earlier run wrote there is replaced.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the figures here ({students: ..., teachers: ...}).",
)
def student(
    config_path: Path,
    train_seed: int,
    train_problems: int,
    eval_seed: int,
    eval_problems: int,
    seeds: int,
    epochs: int | None,
    start_workers: bool,
    out_dir: Path,
    json_path: Path | None,
) -> None:
    """Does the data teach? Make training sets with each strategy through the fleet,
    distill each into a student with TRL's SFTTrainer at equal budgets, and compare the
    students on held-out problems beside the teachers alone."""
    from cord.lab import student as lab_student  # torch, TRL: only here

    opts = lab_student.Options(
        config=config_path,
        train_seed=train_seed,
        train_problems=train_problems,
        eval_seed=eval_seed,
        eval_problems=eval_problems,
        seeds=seeds,
        start_workers=start_workers,
        out=out_dir,
        sft=lab_student.SFT() if epochs is None else lab_student.SFT(epochs=epochs),
    )
    start = time.monotonic()
    try:
        result = lab_student.run(opts, lambda m: click.echo(m, err=True))
    except lab_student.StudentError as e:
        raise click.ClickException(str(e)) from e
    lab_student.save(result, out_dir, json_path)
    click.echo(lab_student.format_table(result))
    click.echo(f"done in {time.monotonic() - start:.0f}s; rows and students in {out_dir}")


if __name__ == "__main__":
    main()
