"""The hf engine's batched prefill: items of one task run in one padded forward pass,
each on top of its own cached prefix, and come out as they would alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from cord.common.messages import ExpandItem, ScoreItem
from cord.common.pools import HFSpec
from cord.workers.engines.hf import HFEngine

MODELS = Path(__file__).resolve().parents[3] / "models"


def score_items(tag: str) -> list[ScoreItem]:
    steps = ["### Step 1. 9 + 6 + 7 + 8", "### Step 2. 15 + 7 + 8", "### Step 3. 22 + 8"]
    return [
        ScoreItem(
            key=f"{tag}{i}", prompt="What is 4 + 5 + 6 + 7 + 8?", steps=steps[:i], answer="30"
        )
        for i in range(4)
    ] + [ScoreItem(key=f"{tag}q", prompt="What is 1 + 2?", steps=["### Step 1. 3"], answer="3")]


@pytest.mark.parametrize("name", ["alpha", "meta"])
def test_a_mixed_batch_scores_as_items_alone(name):
    spec = HFSpec(name=name, model=str(MODELS / name))
    batched, alone = HFEngine(spec), HFEngine(spec)
    # Warm part of the cache so the batch mixes hits of different lengths and misses.
    batched.score(score_items("w")[1:2])
    alone.score(score_items("w")[1:2])
    together = batched.score(score_items("s"))
    single = [alone.score([item])[0] for item in score_items("s")]
    for a, b in zip(together, single, strict=True):
        assert a.error is None and a.answer_tokens == b.answer_tokens
        assert a.score == pytest.approx(b.score, rel=1e-5)
    assert sum(s.cached_tokens for s in together) > 0


def greedy_items(
    tag: str, questions: list[str], steps: list[list[str]], max_new: list[int]
) -> list[ExpandItem]:
    """Greedy expansions, item i continuing `steps[i]` of `questions[i]`."""
    return [
        ExpandItem(
            key=f"{tag}{i}",
            prompt=q,
            steps=s,
            next_step=len(s) + 1,
            max_new_tokens=n,
            temperature=0.0,
            seed=i,
        )
        for i, (q, s, n) in enumerate(zip(questions, steps, max_new, strict=True))
    ]


def test_a_mixed_batch_generates_as_items_alone():
    spec = HFSpec(name="gamma", model=str(MODELS / "gamma"))
    batched, alone = HFEngine(spec), HFEngine(spec)

    def items(tag: str) -> list[ExpandItem]:
        return greedy_items(
            tag,
            ["What is 4 + 5 + 6?", "What is 4 + 5 + 6?", "What is 7 + 7 + 1 + 2?"],
            [[], ["### Step 1. 9 + 6"], []],
            [24] * 3,
        )

    batched.expand(items("w")[:1])
    alone.expand(items("w")[:1])
    together = batched.expand(items("x"))
    single = [alone.expand([item])[0] for item in items("x")]
    assert [(g.text, g.finish, g.tokens) for g in together] == [
        (g.text, g.finish, g.tokens) for g in single
    ]


def test_passes_split_where_padding_costs_more_than_a_pass():
    engine = HFEngine(HFSpec(name="alpha", model=str(MODELS / "alpha")))
    assert engine._passes([5, 5, 6, 7]) == [[0, 1, 2, 3]]
    # One long miss among short hits goes alone: 3 x 500 padded tokens cost more than a pass.
    assert engine._passes([5, 6, 7, 500]) == [[0, 1, 2], [3]]
    assert engine._passes([]) == []


def test_generation_over_several_passes_matches_an_engine_without_cache():
    """Cache hits with short new parts and a long miss prefill in separate passes, each
    into its rows of the decoding slabs (holes after the short ones' new tokens); the
    finished rows' KV goes into the prefix cache and the next step decodes on top of
    it. Every text must be what an engine with no prefix cache writes for each item
    alone."""
    spec = HFSpec(name="alpha", model=str(MODELS / "alpha"))
    engine = HFEngine(spec)
    assert engine._slabs  # the lab's models prefill in place
    plain = HFEngine(spec.model_copy(update={"prefix_cache_tokens": 0}))
    passes: list[int] = []
    cut = engine._passes

    def counted(widths):
        groups = cut(widths)
        passes.extend(len(g) for g in groups)
        return groups

    engine._passes = counted
    long_q = "What is " + " + ".join(str(n % 9 + 1) for n in range(40)) + "?"
    questions = ["What is 4 + 5 + 6?", "What is 7 + 7 + 1 + 2?", "What is 3 + 9?", long_q]

    def items(tag: str, steps: list[list[str]]) -> list[ExpandItem]:
        return greedy_items(tag, questions, steps, [20 + 4 * i for i in range(4)])

    steps: list[list[str]] = [[]] * 4
    engine.expand(items("w", steps)[:3])  # the short questions are cached
    for step in range(1, 4):
        passes.clear()
        batch = items(f"s{step}-", steps)
        got = engine.expand(batch)
        want = [plain.expand([item])[0] for item in batch]
        assert [(g.text, g.finish, g.tokens) for g in got] == [
            (g.text, g.finish, g.tokens) for g in want
        ]
        if step == 1:
            assert len(passes) > 1  # the long miss went in a pass of its own
        assert step == 1 or sum(g.cached_tokens for g in got) > 0
        steps = [[*s, f"### Step {step}.{g.text}"] for s, g in zip(steps, got, strict=True)]
    assert plain.prefix_cache.tokens == 0


def test_models_with_other_cache_layers_take_the_joined_path_to_the_same_texts():
    """A model whose cache layers are not plain full-attention ones (sliding windows)
    prefills into a batch of its own and is realigned into slabs (`_prefill_passes`,
    `_joined`); the lab's models take that path when told to, and must write and score
    what the in-place path does."""
    spec = HFSpec(name="alpha", model=str(MODELS / "alpha"))
    in_place, joined = HFEngine(spec), HFEngine(spec)
    joined._slabs = False
    questions = ["What is 4 + 5 + 6?", "What is 7 + 7 + 1 + 2?", "What is 3 + 9?"]
    steps: list[list[str]] = [[]] * 3
    for step in range(1, 4):
        batch = greedy_items(f"s{step}-", questions, steps, [30, 24, 18])
        a, b = in_place.expand(batch), joined.expand(batch)
        assert [(g.text, g.finish, g.cached_tokens) for g in a] == [
            (g.text, g.finish, g.cached_tokens) for g in b
        ]
        steps = [[*s, f"### Step {step}.{g.text}"] for s, g in zip(steps, a, strict=True)]
    assert sum(g.cached_tokens for g in a) > 0
    for x, y in zip(in_place.score(score_items("k")), joined.score(score_items("k")), strict=True):
        assert x.score == pytest.approx(y.score, rel=1e-5)
