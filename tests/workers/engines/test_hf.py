"""The hf engine against plain transformers on the same tiny models: scores, batched
generation with the prefix cache, stop strings."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cord.common import prompts
from cord.common.messages import AnswerItem, ExpandItem, ScoreItem
from cord.common.pools import HFSpec
from cord.common.scoring import predictive_score
from cord.lab import tinymodels
from cord.workers.engines.hf import HFEngine

MODELS = Path(__file__).resolve().parents[3] / "models"
QUESTIONS = ["What is 1 + 2 + 3?", "What is 4 + 5 + 6 + 7 + 8?", "What is 9 + 9?"]
STEPS = [[], ["### Step 1. 9 + 6 + 7 + 8"], ["### Step 1. 18", "### Step 2. 18"]]


@pytest.fixture(scope="module")
def spiky_models(tmp_path_factory):
    """The lab's three architectures with large random weights, so greedy decoding
    wanders across the vocabulary instead of repeating one token."""
    out = tmp_path_factory.mktemp("spiky")
    text = tinymodels.corpus(200)
    specs = {**tinymodels.SPECS, "charlm": tinymodels.CHAR_SPEC}
    for i, (name, spec) in enumerate(specs.items()):
        tok = tinymodels.build_tokenizer(spec, text)
        model = tinymodels.build_model(spec, tok, seed=100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.5)
        tinymodels.save(model, tok, out / name)
    return out


def reference_greedy(model, tok, eos_ids, text, max_new):
    """Token-by-token greedy decoding with full recomputation: no cache, no batch."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    finish = "length"
    with torch.no_grad():
        for _ in range(max_new):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            token = int(logits.argmax())
            if token in eos_ids:
                finish = "eos"
                break
            out.append(token)
            decoded = tok.decode(out)
            if any(s in decoded for s in prompts.STEP_STOPS):
                finish = "stop"
                break
    return out, finish


@pytest.mark.parametrize("name", ["alpha", "beta", "gamma", "meta", "charlm"])
def test_batched_cached_generation_matches_plain_greedy(spiky_models, name):
    engine = HFEngine(HFSpec(name=name, model=str(spiky_models / name)))
    items = [
        ExpandItem(
            key=f"k{i}",
            prompt=q,
            steps=s,
            next_step=len(s) + 1,
            max_new_tokens=10 + 7 * i,
            temperature=0.0,
            seed=i,
        )
        for i, (q, s) in enumerate(zip(QUESTIONS, STEPS, strict=True))
    ]
    first = engine.expand(items)
    model = AutoModelForCausalLM.from_pretrained(spiky_models / name)
    tok = AutoTokenizer.from_pretrained(spiky_models / name)
    for item, gen in zip(items, first, strict=True):
        text = prompts.chat_prefix(tok, item.prompt) + prompts.think_body(
            item.steps, item.next_step
        )
        ref, finish = reference_greedy(model, tok, engine.eos_ids, text, item.max_new_tokens)
        assert gen.tokens == len(ref)
        assert str(tok.decode(ref)).startswith(gen.text)
        assert (gen.finish == "eos") == (finish == "eos")
        assert gen.cached_tokens == 0 and gen.prompt_tokens == len(tok(text)["input_ids"])
    # The same prompts again: the prefix cache serves all but the last prompt token,
    # and the text is unchanged.
    again = engine.expand(items)
    assert [g.text for g in again] == [g.text for g in first]
    assert [g.cached_tokens for g in again] == [g.prompt_tokens - 1 for g in again]


def test_sampling_is_reproducible_per_seed(spiky_models):
    engine = HFEngine(
        HFSpec(name="alpha", model=str(spiky_models / "alpha"), prefix_cache_tokens=0)
    )
    item = ExpandItem(
        key="k",
        prompt=QUESTIONS[0],
        steps=[],
        next_step=1,
        max_new_tokens=24,
        temperature=1.0,
        seed=7,
    )
    a = engine.expand([item, item.model_copy(update={"key": "k2", "seed": 8})])
    b = engine.expand([item])
    assert a[0].text == b[0].text
    assert a[0].text != a[1].text


@pytest.mark.parametrize("name", ["alpha", "beta", "gamma", "meta"])
def test_score_equals_direct_transformers_computation(name):
    engine = HFEngine(HFSpec(name=name, model=str(MODELS / name)))
    model = AutoModelForCausalLM.from_pretrained(MODELS / name)
    tok = AutoTokenizer.from_pretrained(MODELS / name)
    items = [
        ScoreItem(key=f"s{i}", prompt=q, steps=s, answer=a)
        for i, (q, s, a) in enumerate(zip(QUESTIONS, STEPS, ["6", "30", "18"], strict=True))
    ]
    scores = engine.score(items)
    for item, got in zip(items, scores, strict=True):
        context = prompts.chat_prefix(tok, item.prompt) + prompts.scoring_context(item.steps)
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        ans = tok(prompts.answer_target(item.answer), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + ans])).logits[0].float()
        logp = torch.log_softmax(logits, dim=-1)
        expected = predictive_score([float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(ans)])
        assert got.error is None
        assert got.score == pytest.approx(expected, rel=1e-4)
        assert got.answer_tokens == len(ans)
    # Scoring a candidate that extends a scored trajectory reuses its prefix.
    longer = items[1].model_copy(
        update={"key": "s9", "steps": [*STEPS[1], "### Step 2. 15 + 7 + 8"]}
    )
    (again,) = engine.score([longer])
    shared = prompts.chat_prefix(tok, longer.prompt) + STEPS[1][0]
    assert again.cached_tokens >= len(tok(shared, add_special_tokens=False)["input_ids"]) - 1


def test_stop_strings_cut_the_step(spiky_models):
    engine = HFEngine(HFSpec(name="beta", model=str(MODELS / "beta")))
    from cord.workers.engines.decoding import Row

    def run(text: str):
        row = Row(0, torch.tensor([1]), 100, 0.0, 1.0, torch.Generator(), 0, prompts.STEP_STOPS)
        for token in engine.tokenizer(text, add_special_tokens=False)["input_ids"]:
            if engine._advance(row, token):
                break
        return row

    # The row stops at the token that completes a stop string; the base cuts the text.
    row = run(" 7 + 2 + 9\n### Step 3. more")
    assert row.finish is not None and "more" not in engine.decode(row.out)
    assert engine.cut(row.out, row.stops) == (" 7 + 2 + 9\n", "step")
    row = run(" 18\n</think>\n\nThe final")
    assert row.finish is not None and "final" not in engine.decode(row.out)
    assert engine.cut(row.out, row.stops) == (" 18\n", "think_end")


def test_answer_and_context_errors(tmp_path):
    spec = tinymodels.CHAR_SPEC
    tok = tinymodels.build_tokenizer(spec)
    short = tinymodels.build_model(spec.__class__(**{**spec.__dict__, "context": 32}), tok, 0)
    tinymodels.save(short, tok, tmp_path / "short")
    engine = HFEngine(HFSpec(name="short", model=str(tmp_path / "short")))
    (gen,) = engine.answer(
        [
            AnswerItem(
                key="a",
                prompt="What is 1 + 1?",
                steps=["### Step 1. 2"],
                max_new_tokens=8,
                temperature=0.0,
                seed=0,
            )
        ]
    )
    assert gen.error is not None and "exceed the context" in gen.error and not gen.retryable
