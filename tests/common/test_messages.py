"""The wire types' counters: one set of token kinds for engines, heartbeats and metrics."""

from cord.common.messages import (
    TOKEN_KINDS,
    EngineStats,
    Generation,
    Score,
    TaskResult,
    TokenCounts,
)


def test_a_tasks_tokens_sum_its_items():
    result = TaskResult(
        task_id="t",
        kind="expand",
        model="alpha",
        worker="w",
        generations=[
            Generation(key="a", tokens=5, prompt_tokens=20, cached_tokens=12),
            Generation(key="b", tokens=7, prompt_tokens=22, cached_tokens=20),
        ],
        scores=[Score(key="s", answer_tokens=2, prompt_tokens=30, cached_tokens=0)],
    )
    assert TokenCounts.of(result) == TokenCounts(generated=12, scored=2, prompt=72, cached=32)
    assert TOKEN_KINDS == ("generated", "scored", "prompt", "cached")


def test_engine_stats_since_an_earlier_reading():
    before = EngineStats(requests=3, tokens=TokenCounts(prompt=10, cached=4), busy_s=1.0)
    after = EngineStats(
        requests=5,
        tokens=TokenCounts(prompt=25, cached=9, generated=7),
        busy_s=1.5,
        server_url="http://h:1",
        server_cache_query_tokens=40,
    )
    grown = after.since(before)
    assert (grown.requests, grown.busy_s, grown.server_cache_query_tokens) == (2, 0.5, 40)
    assert grown.tokens == TokenCounts(prompt=15, cached=5, generated=7)
    assert grown.server_url == "http://h:1" and after.tokens.prompt == 25  # untouched
