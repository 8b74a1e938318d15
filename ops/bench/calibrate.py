"""The `sim` engine against the one server that runs here: does it predict a real CPU
vLLM run? (`servers.py pairs` runs this after its real pairs.)

1. **Costs, measured from the real servers** (`measure`): requests of known shapes
   against each pool's running vLLM server, each alone, on prompts no cache holds,
   priced by the CPU time the server's processes took for them (its API front and its
   engine run side by side when the host is idle and take turns when it is busy: CPU
   seconds are what a busy host pays). ``T(B, P, K)`` is B requests at once of P prompt
   tokens generating K tokens each, asked as the vllm engine asks for a step (sampled,
   with its stop strings). In the sim's terms:
   - a decode pass of B sequences, ``base + per_seq x B``: a line through
     ``pass(B) = (T(B, 16, 65) - T(B, 16, 1)) / 64`` at B = 1, 8 and 32;
   - ``per_kv`` per token of context held: the same at B = 8 with 400-token prompts;
   - a prompt token: ``(T(1, 400, 1) - T(1, 16, 1)) / 384``;
   - a request: what ``T(n, 16, 1)`` leaves per request beside their prompts and one
     step's base, n the pool's items per task (a task's requests reach the server
     together and share that step, whose prefill writes each one's first token; a
     request in such a batch costs less than one alone: docs/benchmarks.md);
   each a median of five tries.
2. **Lengths, read from the real run's rows** (`lab_lengths`), fitted to the sim's
   draws by their moments: the candidate steps' tokens and, per pool, the prompts'
   tokens (its own tokenizer and chat template; uniform, the same mean and spread); the
   share of candidates that write the same step as others on their trajectory (the
   lab's small teachers often agree, and identical trajectories are scored once); the
   thinking tokens of CoRD's traces and of curation's, a teacher's whole trajectory
   (log-uniform, the same median and mean); the mean answer, and the tokens of the
   meta-prover's scoring target.
3. **The servers' own set-up**: 32-token blocks, their KV capacity (from their
   heartbeats), no chunked prefill, scoring as one prompt per answer token
   (`score_passes: per_token`, as the vllm engine scores), and passes that spin a core
   for their measured time (`burn_cpu`): the servers and the fleet share this host's
   cores as the real servers did. Each sim worker runs its real pool's tasks at once
   and items per task (`concurrency`, `max_batch`), so its server sees the batches the
   real one saw (a pass's own cost is about 50 sequences' worth: batch sizes decide
   the price).

The sim fleet then runs the same pairs (`pairs.cord_curation_pairs`: the same problems,
curation at the real run's N). `sim_cpu_vllm_prediction_error` is the larger relative
error of its two predictions: the CoRD/curation wall ratio and the model-token ratio.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from harness import r3
from pairs import PairRuns
from transformers import AutoTokenizer

from cord.common import prompts
from cord.common.config import RunConfig
from cord.coordinator.rows import TraceRow
from cord.workers.engines.server import request_json

TRIES = 5
SHORT, LONG, DECODE = 16, 400, 65
BATCHES = (1, 8, 32)  # CoRD's and curation's batches run from a few to hundreds


def spent(
    url: str,
    cpu: Callable[[], float],
    vocab: int,
    rng: random.Random,
    batch: int,
    prompt: int,
    new: int,
) -> float:
    """The server's CPU seconds (`cpu`: its count so far) for `batch` requests at once of
    `prompt` fresh tokens, `new` each."""

    def body() -> dict[str, Any]:
        return {
            "prompt": [rng.randrange(8, vocab - 8) for _ in range(prompt)],
            "max_tokens": new,
            "min_tokens": new,
            "ignore_eos": True,
            "temperature": 0.6,
            "seed": rng.randrange(2**31),
            # As the vllm engine asks for a step: its stops (detokenized and matched as
            # the tokens come) and the token ids back.
            "stop": list(prompts.STEP_STOPS),
            "skip_special_tokens": False,
            "return_token_ids": True,
        }

    bodies = [body() for _ in range(batch)]
    with ThreadPoolExecutor(batch) as pool:
        start = cpu()
        answers = list(pool.map(lambda b: request_json("POST", url + "/v1/completions", b), bodies))
        took = cpu() - start
    for status, answer in answers:
        if status != 200:
            raise RuntimeError(f"calibration request to {url} answered {status}: {answer!r:.200}")
    return took


def measure(
    url: str, cpu: Callable[[], float], vocab: int, together: int, seed: int = 0
) -> dict[str, Any]:
    """A server's costs in the sim's terms (`SimSpec`'s decode_s, prefill_token_s,
    request_s), from the CPU time requests took it, `together` requests arriving at once
    as a task's items do (the module docstring)."""
    rng = random.Random(seed)

    def t(batch: int, prompt: int, new: int) -> float:
        tries = (spent(url, cpu, vocab, rng, batch, prompt, new) for _ in range(TRIES))
        return statistics.median(tries)

    spent(url, cpu, vocab, rng, 1, SHORT, 2)  # a first request of this shape warms its path
    one = t(1, SHORT, 1)
    prefill_token_s = max(0.0, (t(1, LONG, 1) - one) / (LONG - SHORT))
    passes = {b: (t(b, SHORT, DECODE) - t(b, SHORT, 1)) / (DECODE - 1) for b in BATCHES}
    fit = statistics.linear_regression(list(passes), list(passes.values()))
    # Context: a batch of sequences holding LONG tokens each against SHORT ones (their
    # mean context over the passes is the prompt's plus half the new tokens).
    b = BATCHES[1]
    long = (t(b, LONG, DECODE) - t(b, LONG, 1)) / (DECODE - 1)
    per_kv = max(0.0, (long - passes[b]) / (b * (LONG - SHORT)))
    held = SHORT + DECODE // 2  # the short runs' mean context, priced by the line above
    per_seq = max(0.0, fit.slope - per_kv * held)
    base = max(1e-6, fit.intercept)
    batch = t(together, SHORT, 1)
    request_s = max(0.0, (batch - base) / together - SHORT * prefill_token_s)
    return {
        "decode_s": [base, per_seq, per_kv],
        "prefill_token_s": prefill_token_s,
        "request_s": request_s,
    }


def uniform_fit(values: Sequence[float]) -> tuple[int, int]:
    """The uniform range with `values`' mean and standard deviation (whole tokens, at
    least 1): the sim draws a step's tokens uniformly."""
    mean, sd = statistics.mean(values), statistics.pstdev(values)
    half = math.sqrt(3) * sd
    return max(1, round(mean - half)), max(1, round(mean + half))


def log_uniform_fit(values: Sequence[float]) -> tuple[int, int]:
    """The log-uniform range with `values`' median and mean (whole tokens, at least 1):
    the sim draws a problem's trace length so (most short, some long). Median m, range
    m/r to m x r: the mean is m (r - 1/r) / (2 ln r), rising with r; solved by bisection.
    Values whose mean is not above their median get their median alone."""
    median, mean = statistics.median(values), statistics.mean(values)
    lo, hi = 1.0 + 1e-9, 1e6
    for _ in range(200):
        r = math.sqrt(lo * hi)
        if median * (r - 1 / r) / (2 * math.log(r)) < mean:
            lo = r
        else:
            hi = r
    return max(1, round(median / lo)), max(1, round(median * lo))


def agreeing_share(scored: float, k: int) -> float:
    """q such that k candidates, each agreeing with chance q, need `scored` of k scores
    each: ``(1 - (1 - q)^k) / k + (1 - q)``, falling with q (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        q = (lo + hi) / 2
        if (1 - (1 - q) ** k) / k + (1 - q) > scored:
            lo = q
        else:
            hi = q
    return (lo + hi) / 2


def lab_lengths(
    cfg: RunConfig, rows: list[TraceRow], whole: list[TraceRow]
) -> dict[str, dict[str, Any]]:
    """Per pool, the sim's length settings read from real rows: CoRD's `rows` and
    curation's (`whole`: trajectories a teacher wrote whole) (the module docstring).

    A step: the mean of all candidates (the teachers' generated tokens by the rows'
    counters, less the answers, over the expansions; chosen steps run longer than the
    rest) and the spread of the chosen steps, one for all teachers (so candidates that
    agree write the same text). The share that agree: from the share of expansions that
    needed a score of their own (identical trajectories share one), with k candidates a
    trajectory each agreeing with chance q: ``(1 - (1 - q)^k) / k + (1 - q)``. A trace:
    the sim ends a trajectory in the step that reaches its drawn length, so the length
    drawn is the rows' less that step's mean overshoot (``E[s^2] / 2E[s]``)."""
    k = len(cfg.teachers) * cfg.search.samples_per_beam
    answers = [r.stats.answer_tokens for r in rows if r.stats.answer_tokens]
    answer = max(1, round(statistics.mean(answers))) if answers else 10
    expansions = sum(r.stats.expansions for r in rows)
    generated = sum(r.stats.generated_tokens for r in rows)
    answered = sum(r.stats.answers * r.stats.answer_tokens for r in rows)
    chosen = [s.tokens for r in rows for s in r.steps]
    mean = (generated - answered) / expansions if expansions else statistics.mean(chosen)
    mean, sd = max(1.0, mean), statistics.pstdev(chosen)
    half = math.sqrt(3) * sd
    step = [max(1, round(mean - half)), max(1, round(mean + half))]
    overshoot = (sd**2 + mean**2) / (2 * mean)
    scored = sum(r.stats.scorings for r in rows) / expansions if expansions else 1.0
    agree = agreeing_share(scored, k)

    def trace_fit(traces: list[TraceRow]) -> list[int]:
        return list(
            log_uniform_fit([max(1.0, r.stats.thinking_tokens - overshoot) for r in traces])
        )

    out: dict[str, dict[str, Any]] = {}
    for spec in [*cfg.teachers, cfg.meta_prover]:
        assert spec.model is not None
        tok = AutoTokenizer.from_pretrained(spec.model)
        users = [prompts.user_prompt(r.question, cfg.prompt.template) for r in rows]
        prompt = uniform_fit([len(tok.encode(prompts.chat_prefix(tok, u))) for u in users])
        lengths: dict[str, Any] = {
            "prompt_tokens": list(prompt),
            "step_tokens": step,
            "same_step_share": round(agree, 4),
            "trace_tokens": trace_fit(rows),
            "whole_trace_tokens": trace_fit(whole),
            "answer_tokens": answer,
        }
        if spec.name == cfg.meta_prover.name:
            targets = [len(tok.encode(prompts.answer_target(r.reference_answer))) for r in rows]
            lengths["answer_tokens"] = max(1, round(statistics.mean(targets)))
        out[spec.name] = lengths
    return out


def sim_dict(
    cfg: RunConfig,
    data: dict[str, Any],
    costs: dict[str, dict[str, Any]],
    lengths: dict[str, dict[str, Any]],
    kv_tokens: dict[str, int],
) -> dict[str, Any]:
    """The real fleet's config (`data`, read as `cfg`) with every pool a measured CPU
    server on `sim`, fed as the real workers feed theirs: the same tasks at once and
    items per task."""
    sim = dict(data)

    def pool(entry: dict[str, Any]) -> dict[str, Any]:
        name = entry["name"]
        real = cfg.pool(name)
        return {
            "name": name,
            "engine": "sim",
            "model": str(Path(entry["model"]).name),
            "concurrency": real.task_slots,
            "max_batch": real.max_batch,
            "time_scale": 1.0,
            "block_tokens": 32,
            "kv_tokens": kv_tokens[name],
            "score_passes": "per_token",
            "burn_cpu": True,
            **costs[name],
            **lengths[name],
        }

    sim["teachers"] = [pool(t) for t in data["teachers"]]
    sim["meta_prover"] = pool(data["meta_prover"])
    return sim


def prediction(real: PairRuns, sim: PairRuns) -> dict[str, Any]:
    """The sim's predictions of the real pairs' two ratios, and the larger error."""
    mine, theirs = sim.figures("_sim"), real.figures("_vllm")
    out: dict[str, Any] = {}
    errors = []
    for name in ("cord_vs_curation_wall_ratio", "cord_vs_curation_model_token_ratio"):
        predicted, measured = mine[f"{name}_sim"], theirs[f"{name}_vllm"]
        out[f"{name}_sim"] = predicted
        if predicted and measured:
            error = abs(predicted / measured - 1)
            out[f"{name}_sim_error"] = r3(error)
            errors.append(error)
    out["sim_cpu_vllm_prediction_error"] = r3(max(errors)) if len(errors) == 2 else None
    for name in (
        "decode_tokens_per_problem",
        "prefill_tokens_per_problem",
        "scoring_prefill_tokens_per_problem",
        "requests_per_problem",
    ):
        for strategy in ("cord", "curation"):
            out[f"{strategy}_{name}_sim"] = mine[f"{strategy}_{name}_sim"]
    for tag, runs in (("vllm", real), ("sim", sim)):
        for i, strategy in enumerate(("cord", "curation")):
            rows = [row for pair in runs.runs for row in pair[i].rows]
            thinking = [r.stats.thinking_tokens for r in rows]
            out[f"{strategy}_trace_tokens_{tag}"] = round(statistics.mean(thinking), 1)
            for what in ("steps", "expansions", "scorings", "answers"):
                mean = statistics.mean(getattr(r.stats, what) for r in rows)
                out[f"{strategy}_trace_{what}_{tag}"] = round(mean, 2)
    out["curation_samples_sim"] = sim.samples
    out["pairs_cord_wall_s_sim"] = mine["pairs_cord_wall_s_sim"]
    out["pairs_curation_wall_s_sim"] = mine["pairs_curation_wall_s_sim"]
    return out
