"""The `hf` engine on CUDA against plain transformers, same model, same run.

A random-initialised Qwen2-style model of about 0.5B parameters (built from a config:
nothing is downloaded) and the lab meta-prover's tokenizer. Random weights never write a
stop string, so every expansion runs to its token limit: the figures are throughput, not
quality.

- expansion: B beams grow step by step (each step: prompt = question + the steps so far,
  64 new tokens, T = 0.6), through the engine with its prefix KV cache, through the engine
  with the cache off, and through `model.generate` on the full prompt (left-padded batch).
- scoring: B (trajectory, answer) pairs, through the engine (cache on, after the steps
  above) and as one padded forward pass of plain transformers.

    python ops/bench/engine_gpu.py --out /tmp/gpu.json      # prints name=value lines last
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from cord.common import prompts
from cord.common.messages import ExpandItem, ScoreItem
from cord.common.pools import HFSpec
from cord.workers.engines.hf import HFEngine

ROOT = Path(__file__).resolve().parents[2]


def build(path: Path, tokenizer_dir: Path, hidden: int, layers: int) -> int:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(cfg).bfloat16()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def question(i: int, words: int) -> str:
    return f"Problem {i}: " + " ".join(f"{(i * 7 + j) % 97} +" for j in range(words)) + " 1?"


def engine_steps(
    engine: HFEngine, batch: int, steps: int, new: int, words: int, offset: int = 0
) -> tuple[float, int, dict]:
    """`steps` rounds of one expansion per beam; the prompt grows by each step's text."""
    trajectories: list[list[str]] = [[] for _ in range(batch)]
    generated = 0
    sync()
    start = time.perf_counter()
    for step in range(steps):
        items = [
            ExpandItem(
                key=f"{b}:{step}",
                prompt=question(b + offset, words),
                steps=trajectories[b],
                next_step=step + 1,
                max_new_tokens=new,
                temperature=0.6,
                seed=b,
            )
            for b in range(batch)
        ]
        for b, gen in enumerate(engine.expand(items)):
            trajectories[b].append(prompts.clean_step(prompts.step_header(step + 1), gen.text))
            generated += gen.tokens
    sync()
    return time.perf_counter() - start, generated, {"trajectories": trajectories}


def generate_steps(
    engine: HFEngine, trajectories: list[list[str]], new: int, words: int
) -> tuple[float, int]:
    """The same prompts as the engine saw, step by step, through model.generate."""
    tok, model = engine.tokenizer, engine.model
    tok.padding_side = "left"
    batch = len(trajectories)
    steps = len(trajectories[0])
    generated = 0
    sync()
    start = time.perf_counter()
    for step in range(steps):
        texts = [
            prompts.chat_prefix(tok, question(b, words))
            + prompts.think_body(trajectories[b][:step], step + 1)
            for b in range(batch)
        ]
        enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(
            model.device
        )
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=0.6,
            top_p=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=tok.pad_token_id,
        )
        generated += (out.shape[1] - enc["input_ids"].shape[1]) * batch
    sync()
    return time.perf_counter() - start, generated


def score_bench(
    engine: HFEngine, trajectories: list[list[str]], words: int
) -> tuple[float, float, int]:
    tok, model = engine.tokenizer, engine.model
    items = [
        ScoreItem(key=str(b), prompt=question(b, words), steps=t, answer="1234")
        for b, t in enumerate(trajectories)
    ]
    sync()
    start = time.perf_counter()
    scores = engine.score(items)
    sync()
    engine_s = time.perf_counter() - start
    tok.padding_side = "right"
    texts = [
        prompts.chat_prefix(tok, i.prompt) + prompts.scoring_context(i.steps) + i.answer
        for i in items
    ]
    enc = tok(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(model.device)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(**enc).logits
        torch.log_softmax(logits.float(), dim=-1)
    sync()
    plain_s = time.perf_counter() - start
    return engine_s, plain_s, sum(s.prompt_tokens for s in scores)


def measure(
    engine: HFEngine, label: str, batch: int, steps: int, new_tokens: int, words: int
) -> dict[str, Any]:
    """One engine's generation rate and cache share (`label`: with its prefix cache or
    without); with the cache, also its scoring rate and `model.generate`'s rate."""
    # Warm-up on other questions: kernels load and the allocator grows first.
    engine_steps(engine, batch, steps, new_tokens, words, offset=1000)
    engine.prefix_cache.clear()
    before = engine.stats()
    secs, gen, extra = engine_steps(engine, batch, steps, new_tokens, words)
    st = engine.stats()
    prompt = st.tokens.prompt - before.tokens.prompt
    cached = st.tokens.cached - before.tokens.cached
    row = {
        f"engine_{label}_tok_s": round(gen / secs, 1),
        f"engine_{label}_cached_share": round(cached / max(1, prompt), 3),
    }
    if label == "cache":
        trajectories = extra["trajectories"]
        e_s, p_s, scored = score_bench(engine, trajectories, words)
        row["score_engine_tok_s"] = round(scored / e_s, 1)
        row["score_plain_tok_s"] = round(scored / p_s, 1)
        generate_steps(engine, trajectories, new_tokens, words)  # warm-up
        g_s, g_gen = generate_steps(engine, trajectories, new_tokens, words)
        row["generate_tok_s"] = round(g_gen / g_s, 1)
    return row


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--batches", default="8,32", show_default=True)
@click.option("--steps", type=int, default=4, show_default=True)
@click.option("--new-tokens", type=int, default=48, show_default=True)
@click.option("--words", type=int, default=150, show_default=True, help="Question length.")
@click.option("--hidden", type=int, default=1152, show_default=True)
@click.option("--layers", type=int, default=24, show_default=True, help="24 x 1152: ~0.5B")
def main(
    out: Path | None,
    batches: str,
    steps: int,
    new_tokens: int,
    words: int,
    hidden: int,
    layers: int,
) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path("/tmp/cord-bench-0.5b")
    params = build(path, ROOT / "models" / "meta", hidden, layers)
    card = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"model: random Qwen2-style, {params / 1e6:.0f}M parameters, bf16, on {card}")
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {
        "device": card,
        "params": params,
        "steps": steps,
        "new_tokens": new_tokens,
        "rows": rows,
    }
    for batch in [int(b) for b in batches.split(",")]:
        row: dict = {"batch": batch}
        for label, cache in (("nocache", 0), ("cache", 1 << 20)):
            spec = HFSpec(
                name="bench", model=str(path), device=device, dtype="bfloat16",
                prefix_cache_tokens=cache,
            )  # fmt: skip
            row |= measure(HFEngine(spec), label, batch, steps, new_tokens, words)
            if device == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    if out:
        out.write_text(json.dumps(results, indent=2))
    for row in rows:
        b = row["batch"]
        for k, v in row.items():
            if k != "batch":
                print(f"b{b}_{k}={v}")
    last = rows[-1]
    print(f"engine_vs_generate_speedup={last['engine_cache_tok_s'] / last['generate_tok_s']:.3f}")


if __name__ == "__main__":
    main()
