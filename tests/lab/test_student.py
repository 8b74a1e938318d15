"""`cord-lab student`: training sets cut to one budget, the interval, and a small run of
the whole pipeline through a live fleet (export -> SFTTrainer -> a student in HF format
that a `cord-worker` serves)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cord.coordinator.report import STUDENTS_FILE, Students, write_report
from cord.coordinator.rundir import read_run_dir
from cord.lab import student as lab
from cord.lab.arith import held_out_terms
from tests.conftest import MODELS, fleet_config


def row(question: str, steps: list[str], answer: str) -> dict:
    body = "<think>\n" + "\n".join(steps) + "\n</think>\n\nThe final answer is " + answer + "."
    user = [{"role": "user", "content": question}]
    return {"prompt": user, "completion": [{"role": "assistant", "content": body}]}


ROWS = [
    row("What is 1 + 2 + 3?", ["### Step 1. 3 + 3", "### Step 2. 6"], "6"),
    row("What is 9 + 9 + 9 + 9?", ["### Step 1. 18 + 9 + 9", "### Step 2. 27 + 9"], "36"),
    row("What is 4 + 4?", ["### Step 1. 8"], "8"),
]


def test_the_tokens_counted_are_those_sfttrainer_puts_the_loss_on(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(lab.BASE)
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_length=1024)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(lab.BASE),
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=tok,
    )
    built = trainer.train_dataset
    assert isinstance(built, Dataset)
    # TRL turns the completion mask into labels: -100 where there is no loss.
    masks = [sum(label != -100 for label in labels) for labels in built["labels"]]
    assert masks == [lab.completion_tokens(tok, r) for r in ROWS]
    assert all(m > 10 for m in masks)


def test_a_set_s_figures_tell_a_sound_process_from_a_right_answer():
    sound = {**ROWS[0], "question": "What is 1 + 2 + 3?", "correct": True}
    # 1 + 2 -> 4, then 4 + 3 -> 6: the answer is right, neither step is.
    unsound = {
        **row("What is 1 + 2 + 3?", ["### Step 1. 4 + 3", "### Step 2. 6"], "6"),
        "question": "What is 1 + 2 + 3?",
        "correct": True,
    }
    wrong = {**ROWS[2], "question": "What is 4 + 4?", "correct": False}
    f = lab.set_figures([sound, unsound, wrong])
    assert (f.rows, f.correct, f.sound) == (3, 0.6667, 0.6667)
    assert f.step_sound == 0.6 and f.correct_unsound == 0.5  # 3 of 5 steps sound


def test_a_set_is_cut_to_the_budget_the_same_way_for_the_same_seed():
    rows = [{"i": i} for i in range(50)]
    tokens = [10 + i % 7 for i in range(50)]
    kept, total = lab.cut_to_budget(rows, tokens, 200, seed=3)
    assert total == sum(tokens[r["i"]] for r in kept) and 190 <= total <= 200
    assert lab.cut_to_budget(rows, tokens, 200, seed=3) == (kept, total)
    assert lab.cut_to_budget(rows, tokens, 200, seed=4)[0] != kept
    assert lab.cut_to_budget(rows, tokens, 10_000, seed=3)[1] == sum(tokens)


def test_the_interval_holds_the_accuracy_and_narrows_with_more_problems():
    few = [[True, False] * 10]
    many = [[True, False] * 200]
    acc, (lo, hi) = lab.bootstrap(few)
    assert acc == 0.5 and lo < 0.5 < hi
    _, (lo2, hi2) = lab.bootstrap(many)
    assert hi2 - lo2 < (hi - lo) / 2
    # Two seeds: each problem counts their mean.
    acc, _ = lab.bootstrap([[True, True, False, False], [True, False, False, False]])
    assert acc == 0.375
    assert lab.bootstrap([[True] * 30]) == (1.0, (1.0, 1.0))


def test_training_problems_never_meet_the_held_out_ones():
    train, held = lab.split_problems(1234, 400, 7, 300)
    assert len(train) == 400 and len(held) == 300
    held_terms = {p.question for p in held}
    assert not held_terms & {p.question for p in train}
    seen = {"What is " + " + ".join(map(str, t)) + "?" for t in held_out_terms()}
    assert not seen & {p.question for p in train}


def test_the_student_shares_nothing_with_the_teachers():
    mine = AutoTokenizer.from_pretrained(lab.BASE)
    for name in ("alpha", "beta", "gamma", "meta"):
        theirs = AutoTokenizer.from_pretrained(MODELS / name)
        assert mine.get_vocab() != theirs.get_vocab()
        assert mine.chat_template != theirs.chat_template
    config = json.loads((lab.BASE / "config.json").read_text())
    assert config["model_type"] == "gpt2"


@pytest.mark.redis
@pytest.mark.slow
def test_a_small_run_trains_every_student_and_each_answers_through_the_fleet(fleet, tmp_path):
    config, _ = fleet_config(fleet, tmp_path / "run.yaml")
    opts = lab.Options(
        config=config,
        train_seed=1234,
        train_problems=12,
        eval_seed=7,
        eval_problems=3,
        seeds=1,
        start_workers=False,
        out=tmp_path / "out",
        sft=lab.SFT(epochs=1, batch=2),
    )
    result = lab.run(opts, print)
    lab.save(result, opts.out, tmp_path / "students.json")
    wanted = ["none", "cord", "curation", f"single:{result.best_single}"]
    wanted += [f"{n}+correct" for n in wanted[1:]]
    assert sorted(result.students) == sorted(wanted)
    assert sorted(result.teachers) == ["alpha", "beta", "gamma"]
    assert sorted(result.sets) == sorted(wanted[1:])
    assert all(f.rows > 0 and 0.0 <= f.sound <= 1.0 for f in result.sets.values())
    written = Students.model_validate_json((tmp_path / "students.json").read_text())
    assert written == result
    for name, figures in result.students.items():
        assert 0.0 <= figures.ci[0] <= figures.accuracy <= figures.ci[1] <= 1.0
        if name == "none":
            assert figures.tokens == 0
            continue
        # Every set is cut to one budget, the smallest set's tokens.
        assert 0 < figures.tokens <= result.budget_tokens * result.epochs
        folder = opts.out / "students" / lab.pool_name(name, 0)
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in folder.iterdir()
        }
    # The exports are the user's: `cord-coord export`, one per set.
    assert len(list((opts.out / "sets").glob("*.jsonl"))) == 6
    # Each student was a pool of its own: a worker loaded it and it wrote every held-out
    # problem's trace. What a student trained for a few steps writes is its own; the
    # untrained one (the lab's format, pre-trained) ends each with an answer.
    run = read_run_dir(opts.out / "eval")
    by_strategy = {r.strategy: r for r in run.runs}
    for name in result.students:
        pool = lab.pool_name(name if name != "none" else None, 0)
        rows = by_strategy[f"single:{pool}"].traces
        assert len(rows) == 3, rows
        assert all(r.steps and {s.teacher for s in r.steps} == {pool} for r in rows), rows
        assert all(r.answer_teacher == pool for r in rows), rows
        if name == "none":
            assert all(r.final_answer for r in rows), rows
    assert (opts.out / "eval" / STUDENTS_FILE).exists()
    page = write_report(run, tmp_path / "report")
    plot = next(p for p in page.plots if p.name == "students")
    assert set(plot.data) == set(wanted)
    assert "<h2>Students</h2>" in page.index.read_text()


def test_a_student_pool_is_named_for_its_set_and_seed():
    assert lab.pool_name(None, 0) == "student-none"
    assert lab.pool_name("single:gamma+correct", 2) == "student-single-gamma-correct-s2"
    assert Path(lab.BASE).name == "student"


def test_an_out_folder_of_something_else_is_refused_and_a_run_s_own_is_replaced(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data").mkdir()
    (theirs / "data" / "keep.jsonl").write_text("{}\n")
    with pytest.raises(lab.StudentError, match="name a new folder"):
        lab.fresh_out(theirs)
    assert (theirs / "data" / "keep.jsonl").exists()
    mine = tmp_path / "mine"
    lab.fresh_out(mine)
    (mine / "eval" / "old.jsonl").write_text("{}\n")
    lab.fresh_out(mine)
    assert list((mine / "eval").iterdir()) == []
