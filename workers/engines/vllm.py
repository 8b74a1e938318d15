"""The `vllm` engine: a vLLM server (launched and supervised, or attached; see `server`)
does the model work over its OpenAI-compatible ``/v1/completions`` API.

The base (`base.BaseEngine`) builds the prompts and tokenizes them with the model's own
tokenizer, cuts stop strings and computes S, as for every engine; the server gets token
ids, never text (its prefix cache is keyed on ids).

- Requests go one item at a time, all of a task's at once from a thread pool: vLLM
  batches concurrent requests itself (continuous batching), and each answer carries its
  own usage, so every item reports its own cached prompt tokens
  (``usage.prompt_tokens_details.cached_tokens``, with ``--enable-prompt-tokens-details``).
- Expansion: ``stop`` holds the step boundary strings, ``stop_token_ids`` the model's
  end-of-turn ids, ``max_tokens`` is always set, ``seed`` is the item's (the CPU build
  runs seeded requests only without chunked prefill: docs/method.md, "vLLM"), and
  ``return_token_ids`` brings the generated ids back.
- Scoring, from the prefix cache: vLLM never reads its cache for a request that asks for
  ``prompt_logprobs`` (``skip_reading_prefix_cache`` defaults to true for them), so a
  meta-prover would prefill the whole trajectory for every candidate. Instead one request
  per candidate carries M prompts, context + answer[:j] for each answer position j, with
  ``max_tokens: 1`` and ``logprob_token_ids`` set to the answer's token ids: the first
  generated position of prompt j gives log p(answer[j] | context, answer[:j]), the very
  quantity S needs, and every prompt shares the cached context. The log-probs are the
  model's raw ones (vLLM's default ``logprobs_mode``), before temperature. It works the
  same on GPU builds.
- `stats()` adds the server's own prefix-cache counters (``vllm:prefix_cache_hits_total``
  and ``vllm:prefix_cache_queries_total`` from its /metrics).

Errors come back per item: a prompt longer than the server's context is not retryable; a
server that is down, restarting, times out or answers 5xx makes the items retryable.
"""

from __future__ import annotations

import atexit
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from http.client import HTTPException
from typing import Any

from cord.common.pools import VLLMSpec
from cord.workers.engines.base import (
    AnswerLogprobs,
    BaseEngine,
    Done,
    EngineError,
    IdOutput,
    IdRequest,
)
from cord.workers.engines.server import RequestRejected, ServerSupervisor, request_json

_SEED_MOD = 2**63  # vLLM takes int64 seeds; ours are 64-bit digests
_MAX_TOKEN_IDS = 128  # vLLM's MAX_LOGPROB_TOKEN_IDS: ids one request may ask log-probs of
_COUNTER = re.compile(r"^(vllm:prefix_cache_(?:hits|queries)_total)(?:\{[^}]*\})?\s+(\S+)", re.M)
# The server's gauges admission reads (coordinator/admission.py), by our names.
_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "usage",
}


def _is_length_error(message: str) -> bool:
    # vLLM: "This model's maximum context length is N tokens. However, you requested ..."
    # and "... is longer than the maximum model length of N".
    lowered = message.lower()
    return "maximum context length" in lowered or "maximum model length" in lowered


class VLLMServer(ServerSupervisor):
    kind = "vllm"
    label = "vLLM"
    health_path = "/health"

    def __init__(self, spec: VLLMSpec) -> None:
        super().__init__(spec)
        self.vllm = spec

    @property
    def on_cpu(self) -> bool:
        return self.vllm.device.startswith("cpu")

    def command(self, port: int) -> list[str]:
        spec = self.vllm
        dtype = spec.dtype
        if dtype == "auto" and self.on_cpu:
            dtype = "float32"  # as the hf engine on a CPU; vLLM's auto would take bf16
        cmd = [
            *spec.vllm_launch,
            "--model",
            str(spec.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            dtype,
            "--tensor-parallel-size",
            str(spec.tensor_parallel_size),
            "--enable-prefix-caching",
            # Per-request cached tokens in usage: the engine's cache counters.
            "--enable-prompt-tokens-details",
        ]
        if spec.max_model_len is not None:
            cmd += ["--max-model-len", str(spec.max_model_len)]
        if spec.gpu_memory_utilization is not None:
            cmd += ["--gpu-memory-utilization", str(spec.gpu_memory_utilization)]
        if self.on_cpu:
            # The CPU build: no CUDA graphs; seeded requests that chunked prefill splits
            # kill its engine ("CPU Generator does not use offset"); and the model runs
            # in the engine core's process (`launch_env`), not in a worker of its own.
            cmd += ["--enforce-eager", "--no-enable-chunked-prefill"]
            cmd += ["--distributed-executor-backend", "uni"]
            # The KV cache's size in bytes: VLLM_CPU_KVCACHE_SPACE takes whole GiB only
            # (int() of the variable: "0.5" stopped the server).
            cmd += ["--kv-cache-memory-bytes", str(int(spec.cpu_kvcache_gib * 2**30))]
        return [*cmd, *spec.vllm_args]

    def launch_env(self) -> dict[str, str]:
        # No usage reports from a worker's server (and no reach for the network).
        env = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if self.on_cpu:
            # vLLM's CPU build takes a large KV cache (sized in `command`), pins OpenMP
            # threads to cores and runs one per core by default; all three starve the
            # other processes (and servers) of a shared host.
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            env["OMP_NUM_THREADS"] = str(self.vllm.cpu_threads)
            # The CPU build's default executor runs the model in a worker process that
            # spins on its shared-memory queue for a second after every step
            # (shm_broadcast's busy_loop_s): a core each while a server is busy, four
            # servers' spin on two cores outweighed their model work (docs/method.md,
            # "vLLM"). Without V1 multiprocessing the platform keeps the `uni`
            # executor: the model runs in the engine core, which waits without spinning.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        return env

    def probe_request(self) -> tuple[str, dict[str, Any], str]:
        return "/v1/completions", {"prompt": [0], "max_tokens": 1, "temperature": 0.0}, "choices"


class VLLMEngine(BaseEngine):
    streams = True  # one request per item: each is handed over as it ends

    def __init__(self, spec: VLLMSpec) -> None:
        super().__init__(spec)
        self.server = VLLMServer(spec)
        self.server.start()
        atexit.register(self.close)
        # A request per item, every item of every task the worker runs at once in flight
        # together: the server batches them (a smaller pool had the client queue what the
        # server could have batched).
        self._pool = ThreadPoolExecutor(
            spec.task_slots * spec.max_batch, thread_name_prefix=f"cord-vllm-{self.name}"
        )

    def close(self) -> None:
        self.server.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the wire -------------------------------------------------------------------
    def _post(self, body: dict[str, Any]) -> dict[str, Any] | EngineError:
        try:
            answer = self.server.post("/v1/completions", body)
        except RequestRejected as e:
            if _is_length_error(e.message):
                return EngineError(f"vLLM: {e.message}", retryable=False)
            return EngineError(f"vLLM refused the request: {e}", retryable=True)
        except EngineError as e:
            return e
        n = len(body["prompt"]) if body["prompt"] and isinstance(body["prompt"][0], list) else 1
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != n:
            return EngineError(f"vLLM answered {n} prompts with {answer!r:.200}", True)
        return answer

    def _post_all(
        self,
        bodies: list[dict[str, Any]],
        done: Callable[[int, dict[str, Any] | EngineError], None] | None = None,
    ) -> list[dict[str, Any] | EngineError]:
        """Every body's answer; `done(index, answer)` as each one comes (in the pool's
        threads)."""
        if len(bodies) == 1 and done is None:
            return [self._post(bodies[0])]
        futures = {self._pool.submit(self._post, body): i for i, body in enumerate(bodies)}
        answers: list[dict[str, Any] | EngineError] = [EngineError("not run", True)] * len(bodies)
        for future in as_completed(futures):
            index = futures[future]
            answers[index] = future.result()
            if done is not None:
                done(index, answers[index])
        return answers

    @staticmethod
    def _usage(answer: dict[str, Any], default_prompt: int) -> tuple[int, int]:
        usage = answer.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        return int(usage.get("prompt_tokens", default_prompt)), int(
            details.get("cached_tokens") or 0
        )

    # -- generation -----------------------------------------------------------------
    def _body(self, r: IdRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": r.ids,
            "max_tokens": r.max_new,
            "temperature": r.temperature,
            "top_p": r.top_p,
            "seed": r.seed % _SEED_MOD,
            "stop_token_ids": sorted(self.eos_ids),
            # Stop strings are matched on decoded text; a template whose </think> is a
            # special token would never match it with special tokens skipped.
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        if r.stops:
            body["stop"] = list(r.stops)
        return body

    def generate_ids(
        self, requests: list[IdRequest], done: Done | None = None
    ) -> list[IdOutput | EngineError]:
        def output(i: int, a: dict[str, Any] | EngineError) -> IdOutput | EngineError:
            return a if isinstance(a, EngineError) else self._output(requests[i], a)

        def ended(i: int, a: dict[str, Any] | EngineError) -> None:
            assert done is not None
            done(i, output(i, a))

        answers = self._post_all([self._body(r) for r in requests], ended if done else None)
        return [output(i, a) for i, a in enumerate(answers)]

    def _output(self, r: IdRequest, answer: dict[str, Any]) -> IdOutput:
        (choice,) = answer["choices"]
        ids = [int(t) for t in choice.get("token_ids") or []]
        reason, stop = choice.get("finish_reason"), choice.get("stop_reason")
        # An end-of-turn id ends it: stop_reason None (the model's eos) or that id.
        eos = reason == "stop" and not isinstance(stop, str)
        if eos and ids and ids[-1] in self.eos_ids:
            ids.pop()  # hf neither counts nor decodes the end-of-turn token
        ours = reason == "stop" and isinstance(stop, str) and stop in r.stops
        prompt, cached = self._usage(answer, len(r.ids))
        return IdOutput(
            ids,
            prompt,
            cached,
            eos=eos,
            matched=stop if ours else None,
            text=str(choice.get("text", "")) if ours else None,
        )

    # -- scoring --------------------------------------------------------------------
    def answer_logprobs(
        self, pairs: list[tuple[list[int], list[int]]]
    ) -> list[AnswerLogprobs | EngineError]:
        bodies: list[dict[str, Any]] = []
        plans: list[tuple[int, list[int]]] = []  # per body: its pair, its answer positions
        for index, (context, target) in enumerate(pairs):
            wanted = sorted(set(target))
            for lo in range(0, len(wanted), _MAX_TOKEN_IDS):
                ids = wanted[lo : lo + _MAX_TOKEN_IDS]
                positions = [j for j, t in enumerate(target) if t in ids]
                bodies.append(
                    {
                        "prompt": [context + target[:j] for j in positions],
                        "max_tokens": 1,
                        "temperature": 0.0,
                        "logprobs": 0,
                        "logprob_token_ids": ids,
                        "return_tokens_as_token_ids": True,
                    }
                )
                plans.append((index, positions))
        answers = self._post_all(bodies)
        out: list[AnswerLogprobs | EngineError] = []
        for index, (_, target) in enumerate(pairs):
            mine = [
                (a, positions)
                for a, (owner, positions) in zip(answers, plans, strict=True)
                if owner == index
            ]
            out.append(self._logprobs(target, mine))
        return out

    def _logprobs(
        self, target: list[int], answers: list[tuple[dict[str, Any] | EngineError, list[int]]]
    ) -> AnswerLogprobs | EngineError:
        """S's log-probs from the answers of one pair's requests: choice k of a request
        holds position positions[k] of the answer."""
        values: dict[int, float] = {}  # answer position -> log-prob
        prompt_tokens = cached = 0
        for answer, positions in answers:
            if isinstance(answer, EngineError):
                return answer
            p, c = self._usage(answer, 0)
            # vLLM reports the cached tokens of a request's last prompt only
            # (serving.py: `last_final_res.num_cached_tokens`); the prompts of one request
            # share their context, so each is counted as finding what the last found
            # (the servers' own counters, in `stats()`, are exact).
            prompt_tokens += p
            cached += min(c * len(positions), max(0, p - len(positions)))
            for choice in answer["choices"]:
                k = int(choice.get("index", -1))
                j = positions[k] if 0 <= k < len(positions) else -1
                top = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
                key = f"token_id:{target[j]}" if j >= 0 else ""
                if key not in top:
                    return EngineError(
                        f"vLLM returned log-probs for other tokens than the answer's {target} "
                        f"({choice!r:.300}); does the server run model {self.spec.model!r}?",
                        retryable=False,
                    )
                values[j] = float(top[key])
        if sorted(values) != list(range(len(target))):
            return EngineError(f"vLLM scored positions {sorted(values)} of {len(target)}", True)
        return AnswerLogprobs([values[j] for j in range(len(target))], prompt_tokens, cached)

    # -- the server's own counters ----------------------------------------------------
    def server_metrics(self) -> dict[str, float]:
        """From the server's /metrics ({} if unread): its prefix-cache counters (tokens:
        `hits`, `queries`), its queue (`running`, `waiting` sequences) and its KV cache
        (`usage`, a share; `blocks` x `block_size` tokens, from its cache config). Read
        with every heartbeat: a short timeout, so a restarting server never holds the
        heartbeat up until the worker looks lost."""
        try:
            status, text = request_json("GET", self.server.url + "/metrics", timeout=2.0)
        except (OSError, HTTPException):
            return {}
        if status != 200 or not isinstance(text, str):
            return {}
        found: dict[str, float] = {}
        for name, value in _COUNTER.findall(text):
            key = "hits" if "hits" in name else "queries"
            found[key] = found.get(key, 0.0) + float(value)
        for name, key in _GAUGES.items():
            values = re.findall(rf"^{name}(?:{{[^}}]*}})?\s+(\S+)", text, re.M)
            if values:
                found[key] = sum(float(v) for v in values)
        config = re.search(r"^vllm:cache_config_info{([^}]*)}", text, re.M)
        if config:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', config.group(1)))
            for key in ("num_gpu_blocks", "block_size"):
                if labels.get(key, "").isdigit():
                    found[key] = float(labels[key])
        return found

    def runtime_stats(self) -> dict[str, Any]:
        found = self.server_metrics()
        stats: dict[str, Any] = {
            "server_url": self.server.url,
            "server_restarts": self.server.restarts,
            "server_cache_hit_tokens": int(found.get("hits", 0)),
            "server_cache_query_tokens": int(found.get("queries", 0)),
        }
        if {"num_gpu_blocks", "block_size", "usage", "running", "waiting"} <= set(found):
            capacity = int(found["num_gpu_blocks"] * found["block_size"])
            stats.update(
                kv_capacity_tokens=capacity,
                kv_used_tokens=int(found["usage"] * capacity),
                requests_running=int(found["running"]),
                requests_waiting=int(found["waiting"]),
            )
        return stats
