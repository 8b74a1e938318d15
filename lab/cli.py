"""``cord-lab``: the lab's tools, apart from the fleet's.

    cord-lab problems --n 20 --seed 1000 [--like gsm8k|math] [--out FILE]
    cord-lab train --out models [--only alpha] [--scale 0.2]

`problems` writes arithmetic problems the bundled models can solve (as cord's own input,
or shaped as GSM8K and MATH write theirs, to try `enqueue`'s field mapping); `train`
trains the bundled models again (`cord.lab.train`, about 40 minutes on 2 cores).
"""

from __future__ import annotations

import json
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


if __name__ == "__main__":
    main()
