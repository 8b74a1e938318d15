#!/usr/bin/env bash
# Check the `sglang` engine against real SGLang on a GPU box, through cord's own code
# (cord.workers.engines.load_engine with engine: sglang): the worker launches and
# supervises `python -m sglang.launch_server`, then
#   1. expand: one step, cut at the step boundary, no error;
#   2. the same item (same seed) again gives the same text (deterministic inference);
#   3. a second expansion sharing the prefix reports cached_tokens > 0;
#   4. score: S in (0, 1], and again with the context cached (cached_tokens > 0);
#      with COMPARE_HF=1, S is compared with the hf engine's on the same GPU;
#   5. restart (RESTART_CHECK=1): kill -9 the server; the request it held fails as
#      retryable, the supervisor starts a new one, the next request succeeds.
# Prints PASS/FAIL lines, then name=value lines; exits 1 if any check failed.
#
# Needs: pip install -e ".[sglang]" (CUDA), and the model local or downloadable.
# Usage:  ops/gpu-check.sh [MODEL]            (default Qwen/Qwen2.5-0.5B-Instruct)
# Environment: PYTHON (python), MEM_FRACTION (0.6: leaves room for the hf comparison),
#   STARTUP_TIMEOUT_S (900), COMPARE_HF (1), RESTART_CHECK (1),
#   SGLANG_ARGS (extra launch_server arguments, space-separated).
set -euo pipefail

MODEL="${1:-Qwen/Qwen2.5-0.5B-Instruct}"
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."

if ! "$PYTHON" -c "import sglang" 2>/dev/null; then
    echo "FAIL sglang is not installed for $PYTHON (pip install -e '.[sglang]')"
    echo "result=FAIL"
    exit 1
fi
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "FAIL no NVIDIA GPU visible (nvidia-smi -L)"
    echo "result=FAIL"
    exit 1
fi

export MODEL
export MEM_FRACTION="${MEM_FRACTION:-0.6}"
export STARTUP_TIMEOUT_S="${STARTUP_TIMEOUT_S:-900}"
export COMPARE_HF="${COMPARE_HF:-1}"
export RESTART_CHECK="${RESTART_CHECK:-1}"
export SGLANG_ARGS="${SGLANG_ARGS:-}"

exec "$PYTHON" - <<'PY'
import os
import signal
import sys
import time

from cord.common import prompts
from cord.common.config import model_spec
from cord.common.messages import ExpandItem, ScoreItem
from cord.workers.engines import load_engine

model = os.environ["MODEL"]
values: dict[str, object] = {"model": model}
failed: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}".rstrip(), flush=True)
    if not ok:
        failed.append(name)
    return ok


def finish() -> None:
    values["failed"] = ",".join(failed) or "none"
    values["result"] = "FAIL" if failed else "PASS"
    for key, value in values.items():
        print(f"{key}={value}")
    sys.exit(1 if failed else 0)


spec = model_spec(
    name="gpucheck",
    model=model,
    engine="sglang",
    mem_fraction_static=float(os.environ["MEM_FRACTION"]),
    startup_timeout_s=float(os.environ["STARTUP_TIMEOUT_S"]),
    sglang_args=os.environ["SGLANG_ARGS"].split(),
)
began = time.monotonic()
try:
    engine = load_engine(spec)
except Exception as e:  # the message carries the tail of the server's log
    check("start", False, str(e))
    finish()
values["start_s"] = round(time.monotonic() - began, 1)
check("start", True, f"server {engine.server.url} in {values['start_s']}s")

user = prompts.user_prompt("What is 17 + 25 + 8?")
first = ExpandItem(
    key="e1", prompt=user, steps=[], next_step=1, max_new_tokens=256, temperature=0.6, seed=11
)

# 1. expand
(gen,) = engine.expand([first])
values.update(expand_finish=gen.finish, expand_tokens=gen.tokens, expand_error=gen.error)
values["expand_prompt_tokens"] = gen.prompt_tokens
check(
    "expand",
    gen.error is None and gen.tokens > 0 and not any(s in gen.text for s in prompts.STEP_STOPS),
    f"finish={gen.finish} tokens={gen.tokens} text={gen.text[:100]!r}",
)

# 2. same seed, same text
(again,) = engine.expand([first])
values["same_seed_same_text"] = again.text == gen.text
check("same_seed_same_text", again.error is None and again.text == gen.text)

# 3. a second step shares the prefix
step1 = prompts.clean_step(prompts.step_header(1), gen.text or " 17 + 25 = 42")
second = first.model_copy(update={"key": "e2", "steps": [step1], "next_step": 2})
(gen2,) = engine.expand([second])
values["expand2_cached_tokens"] = gen2.cached_tokens
values["expand2_prompt_tokens"] = gen2.prompt_tokens
check(
    "expand_cached_tokens",
    gen2.error is None and gen2.cached_tokens > 0,
    f"cached {gen2.cached_tokens} of {gen2.prompt_tokens} prompt tokens",
)

# 4. score, twice (the second time with its context cached)
item = ScoreItem(key="s1", prompt=user, steps=[step1, "### Step 2. 42 + 8 = 50"], answer="50")
(score,) = engine.score([item])
values.update(score=score.score, score_answer_tokens=score.answer_tokens)
check(
    "score",
    score.error is None and 0.0 < score.score <= 1.0 and score.answer_tokens > 0,
    f"S={score.score:.4f} error={score.error}",
)
(score2,) = engine.score([item.model_copy(update={"key": "s2"})])
values["score2_cached_tokens"] = score2.cached_tokens
check(
    "score_cached_tokens",
    score2.error is None and score2.cached_tokens > 0 and abs(score2.score - score.score) < 1e-2,
    f"cached {score2.cached_tokens} of {score2.prompt_tokens}, S={score2.score:.4f}",
)

if os.environ["COMPARE_HF"] == "1":
    from cord.workers.engines.hf import HFEngine

    hf = HFEngine(model_spec(name="gpucheck", model=model, device="cuda", dtype="bfloat16"))
    (want,) = hf.score([item])
    values["score_hf"] = want.score
    values["score_abs_diff"] = abs(want.score - score.score)
    # Both bf16, different kernels: a few percent apart at most.
    check(
        "score_matches_hf",
        want.error is None and abs(want.score - score.score) <= 0.05 * max(want.score, 1e-3),
        f"sglang {score.score:.4f} hf {want.score:.4f}",
    )
    del hf

if os.environ["RESTART_CHECK"] == "1":
    import threading

    server = engine.server
    pid, restarts = server.pid, server.restarts
    held: list = []
    # 32 whole trajectories of up to 4096 tokens: the batch is still running a second later.
    batch = [
        first.model_copy(
            update={
                "key": f"r{i}",
                "whole": True,
                "max_new_tokens": 4096,
                "temperature": 1.0,
                "seed": i,
            }
        )
        for i in range(32)
    ]
    worker = threading.Thread(target=lambda: held.extend(engine.expand(batch)))
    worker.start()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)
    worker.join(120)
    check(
        "killed_request_retryable",
        len(held) == len(batch) and all(g.error is not None and g.retryable for g in held),
        f"error={held[0].error if held else 'no answer'}",
    )
    deadline = time.monotonic() + float(os.environ["STARTUP_TIMEOUT_S"])
    while server.restarts == restarts and time.monotonic() < deadline:
        time.sleep(0.5)
    began = time.monotonic()
    (after,) = engine.expand([first.model_copy(update={"key": "after"})])
    values["restart_s"] = round(time.monotonic() - began, 1)
    values["restarts"] = server.restarts
    check(
        "restarted",
        after.error is None and server.restarts == restarts + 1 and server.pid != pid,
        f"new pid {server.pid}, next request error={after.error}",
    )

engine.close()
stats = engine.stats()
for key in ("requests", "prompt_tokens", "cached_tokens", "generated_tokens", "scored_tokens"):
    values[f"engine_{key}"] = stats[key]
finish()
PY
