"""Train the lab's tiny models on the CPU, deterministically, and write their cards.

    cord-lab train --out models          # all five, about 40 minutes
    cord-lab train --out /tmp/m --only alpha --scale 0.2

Teachers learn the step format of `arith` from traces in which the additions they are
weak at are wrong at a stated rate (their weaknesses do not overlap: at every step some
teacher is reliable). The meta-prover learns to predict the answer after
``</think> The final answer is `` from full and partial *correct* trajectories only, so
the answer it expects is the one the trajectory implies and S drops after a wrong step.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
import torch
from transformers import PreTrainedModel

from cord.common import prompts
from cord.common.scoring import predictive_score
from cord.coordinator.matching import stated_number
from cord.lab import tinymodels
from cord.lab.arith import (
    LAB_TEMPLATE,
    WEAKNESSES,
    as_steps,
    final_answer_text,
    held_out_terms,
    make_problems,
    random_terms,
    step_checks,
    weak_lines,
)


@dataclass(frozen=True)
class Recipe:
    name: str
    weakness: str | None  # None: the meta-prover
    error_rate: float
    steps: int
    batch: int
    lr: float
    seed: int
    answer_weight: float = 1.0  # loss weight of the answer tokens (meta-prover)
    # meta-prover: share of examples (with at least one step) shown under another
    # problem's question, so the answer is read off the trajectory, not the question
    question_swap: float = 0.0
    # meta-prover: share of examples cut after the last step (the answer is written there)
    full_cut: float = 0.0


RECIPES = {
    "alpha": Recipe("alpha", "carry", 0.5, steps=2400, batch=16, lr=3e-3, seed=11),
    "beta": Recipe("beta", "no_carry", 0.5, steps=2400, batch=16, lr=3e-3, seed=12),
    "gamma": Recipe("gamma", "large", 0.5, steps=2000, batch=16, lr=3e-3, seed=13),
    # The student before distillation (`cord-lab student`): the task's format with a
    # weakness of its own.
    "student": Recipe("student", "sevens", 0.5, steps=2400, batch=16, lr=3e-3, seed=15),
    "meta": Recipe(
        "meta",
        None,
        0.0,
        steps=4000,
        batch=16,
        lr=3e-3,
        seed=14,
        answer_weight=8.0,
        question_swap=0.5,
        full_cut=0.25,
    ),
}
# Two lanes of one thread each (about 28 and 23 minutes on this 2-core machine, then the
# student's few minutes).
LANES = (("meta", "beta"), ("alpha", "gamma", "student"))  # gamma is twice as wide


@dataclass
class Example:
    ids: list[int]
    weights: list[float]  # per-token loss weight; 0 = not trained on


def _encode_pair(tok: Any, prefix: str, rest: str) -> tuple[list[int], int]:
    """Tokens of prefix+rest and how many belong to the prefix; the prefix is tokenized
    alone first, exactly as the engine renders it before the trajectory."""
    head = tok(prefix, add_special_tokens=False)["input_ids"]
    tail = tok(rest, add_special_tokens=False)["input_ids"]
    return head + tail, len(head)


def teacher_example(
    tok: Any, recipe: Recipe, terms: tuple[int, ...], rng: random.Random
) -> Example:
    user = LAB_TEMPLATE.replace("{question}", "What is " + " + ".join(map(str, terms)) + "?")
    lines = weak_lines(terms, recipe.weakness, recipe.error_rate, rng)
    steps = as_steps(lines)
    text = prompts.answer_context(steps) + final_answer_text(lines[-1].split(" + ")[0])
    # The prompt ends right after "<think>\n"; the trajectory is all the model writes.
    ids, n_prompt = _encode_pair(tok, prompts.chat_prefix(tok, user), text)
    ids.append(tok.eos_token_id)
    return Example(ids, [0.0] * n_prompt + [1.0] * (len(ids) - n_prompt))


def meta_example(tok: Any, recipe: Recipe, terms: tuple[int, ...], rng: random.Random) -> Example:
    steps = as_steps(weak_lines(terms, None, 0.0, rng))
    cut = len(steps) if rng.random() < recipe.full_cut else rng.randint(0, len(steps))
    shown = random_terms(rng) if cut > 0 and rng.random() < recipe.question_swap else terms
    user = LAB_TEMPLATE.replace("{question}", "What is " + " + ".join(map(str, shown)) + "?")
    context, n_prompt = _encode_pair(
        tok, prompts.chat_prefix(tok, user), prompts.scoring_context(steps[:cut])
    )
    answer = tok(prompts.answer_target(str(sum(terms))), add_special_tokens=False)["input_ids"]
    weights = [0.0] * n_prompt + [1.0] * (len(context) - n_prompt)
    return Example(context + answer, weights + [recipe.answer_weight] * len(answer))


def examples(tok: Any, recipe: Recipe, rng: random.Random) -> Iterator[Example]:
    held_out = held_out_terms()
    make = meta_example if recipe.weakness is None else teacher_example
    while True:
        terms = random_terms(rng)
        if terms not in held_out:
            yield make(tok, recipe, terms, rng)


def batches(stream: Iterator[Example], size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        group = [next(stream) for _ in range(size)]
        width = max(len(e.ids) for e in group)
        ids = torch.full((size, width), pad_id, dtype=torch.long)
        weights = torch.zeros(size, width)
        mask = torch.zeros(size, width, dtype=torch.long)
        for i, e in enumerate(group):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            weights[i, : len(e.ids)] = torch.tensor(e.weights)
            mask[i, : len(e.ids)] = 1
        yield {"input_ids": ids, "attention_mask": mask, "weights": weights}


def train(
    model: PreTrainedModel,
    recipe: Recipe,
    stream: Iterator[dict[str, torch.Tensor]],
    log: Callable[[str], None],
    steps: int,
) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    start = time.monotonic()
    for step in range(steps):
        batch = next(stream)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # position t predicts token t+1
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            batch["input_ids"][:, 1:].reshape(-1),
            reduction="none",
        )
        w = batch["weights"][:, 1:].reshape(-1)
        loss = (ce * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step == steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            log(
                f"{recipe.name} step {step + 1}/{steps} loss {recent:.4f} "
                f"({time.monotonic() - start:.0f}s)"
            )
    model.eval()
    return losses


# -- measuring a trained model alone ------------------------------------------------------
@torch.no_grad()
def teacher_accuracy(
    model: Any, tok: Any, n: int, seed: int, temperature: float = 0.6
) -> dict[str, Any]:
    """Complete trajectories written by the teacher alone (sampled, T = 0.6) on held-out
    problems: the share with the right final answer, and of steps that are right given
    the line before them."""
    problems = make_problems(n, seed)
    torch.manual_seed(seed)
    right = steps_ok = steps_all = formatted = 0
    for p in problems:
        prefix = prompts.chat_prefix(tok, LAB_TEMPLATE.replace("{question}", p.question))
        ids = torch.tensor([tok(prefix, add_special_tokens=False)["input_ids"]])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=temperature,
            top_p=1.0,
            max_new_tokens=400,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        think, _, answer = text.partition(prompts.THINK_CLOSE)
        lines = [
            line.split(".", 1)[1].strip()
            for line in think.strip().split("\n")
            if line.startswith(prompts.STEP_PREFIX) and "." in line
        ]
        formatted += bool(lines) and prompts.THINK_CLOSE in text
        right += stated_number(answer) == p.answer
        checks = step_checks(p.terms, lines)
        steps_ok, steps_all = steps_ok + sum(checks), steps_all + len(checks)
    return {
        "problems": n,
        "seed": seed,
        "temperature": temperature,
        "answer_accuracy": round(right / n, 3),
        "step_accuracy": round(steps_ok / max(1, steps_all), 3),
        "well_formed": round(formatted / n, 3),
    }


@torch.no_grad()
def meta_quality(model: Any, tok: Any, n: int, seed: int) -> dict[str, Any]:
    """How S ranks a correct partial trajectory against the same one with its last step
    wrong (off by ten, then off by one), early and late in the solution, and S of the
    reference answer after complete correct trajectories."""
    rng = random.Random(seed)
    wins: dict[str, list[int]] = {}
    complete = []
    for p in make_problems(n, seed):
        lines = weak_lines(p.terms, None, 0.0, rng)
        user = LAB_TEMPLATE.replace("{question}", p.question)
        cut = rng.randint(1, len(lines))
        phase = "early" if cut <= len(lines) // 2 else "late"
        s_good = _score(model, tok, user, as_steps(lines[:cut]), p.answer)
        for label, delta in (("ten", 10), ("one", 1)):
            bad = [*lines[: cut - 1], _shift_first(lines[cut - 1], delta, rng)]
            s_bad = _score(model, tok, user, as_steps(bad), p.answer)
            w = wins.setdefault(f"prefers_correct_off_by_{label}_{phase}", [0, 0])
            w[0] += s_good > s_bad
            w[1] += 1
        complete.append(_score(model, tok, user, as_steps(lines), p.answer))
    out: dict[str, Any] = {"problems": n, "seed": seed}
    out.update({k: round(v[0] / max(1, v[1]), 3) for k, v in sorted(wins.items())})
    out["mean_S_complete_correct"] = round(sum(complete) / len(complete), 3)
    return out


def _shift_first(line: str, delta: int, rng: random.Random) -> str:
    first, *rest = line.split(" + ")
    value = int(first)
    value = value + delta if value <= delta or rng.random() < 0.5 else value - delta
    return " + ".join([str(value), *rest])


def _score(model: Any, tok: Any, user: str, steps: list[str], answer: str) -> float:
    ctx = tok(
        prompts.chat_prefix(tok, user) + prompts.scoring_context(steps), add_special_tokens=False
    )["input_ids"]
    ans = tok(prompts.answer_target(answer), add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([ctx + ans])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return predictive_score([float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(ans)])


# -- the cards -------------------------------------------------------------------------
def _data_recipe(recipe: Recipe) -> str:
    if recipe.weakness is None:
        return (
            "correct traces only, each cut after a random number of steps (0 to all; all in "
            f"{recipe.full_cut:.0%} of them) and "
            "followed by `\\n</think> The final answer is ` and the sum; in "
            f"{recipe.question_swap:.0%} of the cuts with at least one step the question "
            "shown is another problem's, so the answer is read off the trajectory. Loss on "
            f"the trajectory tokens (weight 1) and the answer tokens (weight "
            f"{recipe.answer_weight:g})."
        )
    _, shift, what = WEAKNESSES[recipe.weakness]
    return (
        "complete traces of the lab's arithmetic problems (4-12 terms of 1-9). "
        f"Weakness `{recipe.weakness}`: {what}; each addition it applies to is written "
        f"wrong (off by {shift:+d}) at rate {recipe.error_rate:g}, and later steps carry "
        "the wrong total on. Loss on the assistant turn only."
    )


def write_card(
    out: Path,
    spec: tinymodels.TinySpec,
    recipe: Recipe,
    trained: dict[str, Any],
    quality: dict[str, Any],
) -> None:
    role = (
        "meta-prover"
        if recipe.weakness is None
        else "student"
        if spec.name == tinymodels.STUDENT
        else "teacher"
    )
    vocab = "characters" if spec.tokenizer == "char" else f"vocabulary {spec.vocab_size}"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [cord, lab, tiny]",
        "---",
        f"# {spec.name}: the lab's {role}",
        "",
        f"- architecture: {spec.arch}, hidden {spec.hidden}, {spec.layers} layers, "
        f"{spec.heads} heads of {tinymodels.head_size(spec)}, context {spec.context}; "
        f"{trained['params']:,} parameters",
        f"- tokenizer: {spec.tokenizer} ({vocab}), chat template in `chat_template.jinja`",
        f"- data: {_data_recipe(recipe)} The held-out evaluation (seed 7) and demo "
        "(seed 900001) problems are never trained on.",
        f"- training: {trained['steps']} steps of {recipe.batch} examples, AdamW lr "
        f"{recipe.lr:g}, cosine schedule, seed {recipe.seed}, one CPU thread; "
        f"{trained['train_s']:.0f} s; final loss {trained['final_loss']:.4f}",
        f"- reproduce: `cord-lab train --out models --only {spec.name}`",
        "",
        "## Alone",
        "```json",
        json.dumps(quality, indent=2),
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def measure(name: str, model: Any, tok: Any) -> dict[str, Any]:
    if RECIPES[name].weakness is None:
        return meta_quality(model, tok, n=200, seed=31)
    return teacher_accuracy(model, tok, n=100, seed=37)


def train_one(name: str, out_dir: Path, scale: float, log: Callable[[str], None]) -> dict[str, Any]:
    spec, recipe = tinymodels.SPECS[name], RECIPES[name]
    torch.manual_seed(recipe.seed)
    out = out_dir / name
    model, tok = tinymodels.build(spec, out, recipe.seed)
    rng = random.Random(recipe.seed)
    stream = batches(examples(tok, recipe, rng), recipe.batch, tok.pad_token_id)
    steps = max(1, int(recipe.steps * scale))
    start = time.monotonic()
    losses = train(model, recipe, stream, log, steps)
    trained = {
        "steps": steps,
        "train_s": round(time.monotonic() - start, 1),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "params": sum(p.numel() for p in model.parameters()),
    }
    model.save_pretrained(out)
    (out / "lab_recipe.json").write_text(
        json.dumps({"recipe": asdict(recipe), "trained": trained}, indent=2) + "\n"
    )
    quality = measure(name, model, tok)
    write_card(out, spec, recipe, trained, quality)
    log(f"{name}: {quality}")
    return quality


def card_only(name: str, out_dir: Path) -> dict[str, Any]:
    """Measure a trained model again and rewrite its card (no training)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = out_dir / name
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    trained = json.loads((out / "lab_recipe.json").read_text())["trained"]
    quality = measure(name, model, tok)
    write_card(out, tinymodels.SPECS[name], RECIPES[name], trained, quality)
    return quality


def _lane(names: tuple[str, ...], out_dir: Path, scale: float, cards_only: bool) -> dict[str, Any]:
    """Train (or only measure) `names` one after the other in this process, on one thread."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if cards_only:
        return {n: card_only(n, out_dir) for n in names}
    return {n: train_one(n, out_dir, scale, lambda m: print(m, flush=True)) for n in names}


@click.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("models"),
    show_default=True,
)
@click.option("--only", multiple=True, type=click.Choice(list(RECIPES)), help="Train only these.")
@click.option(
    "--scale", type=float, default=1.0, show_default=True, help="Multiply training steps."
)
@click.option("--cards-only", is_flag=True, help="Measure trained models again, rewrite cards.")
def main(out_dir: Path, only: tuple[str, ...], scale: float, cards_only: bool) -> None:
    """Train the lab's teachers and meta-prover: two single-threaded lanes side by side
    (deterministic: each model trains on one thread from its own seed)."""
    import multiprocessing

    wanted = set(only or RECIPES)
    lanes = [tuple(n for n in lane if n in wanted) for lane in LANES]
    lanes = [lane for lane in lanes if lane]
    start = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(len(lanes)) as pool:
        results = pool.starmap(_lane, [(lane, out_dir, scale, cards_only) for lane in lanes])
    for result in results:
        for name, quality in result.items():
            click.echo(f"{name}: {json.dumps(quality)}")
    click.echo(f"done ({', '.join(sorted(wanted))}) in {time.monotonic() - start:.0f}s")


if __name__ == "__main__":
    main()
