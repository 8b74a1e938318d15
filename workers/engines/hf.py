"""The `hf` engine: transformers + torch, on CPU or CUDA.

- Batched generation with stop strings (``### Step`` / ``</think>``) and per-item seeds,
  so a re-dispatched item reproduces its text.
- Log-probabilities of given tokens (the reference answer) for the meta-prover's score.
- Each model's own chat template and tokenizer; trajectories arrive as text.
- A prefix KV cache (`kvcache.PrefixCache`): each request reuses the longest cached
  prefix of its token ids and reports how many prompt tokens came from it.

Prefill (`_prefill_many`): the items of a task run in one forward pass, each on top of
its own cached prefix: the cached KVs are left-padded to a common length and the new
tokens right-padded after them, with explicit position ids and an attention mask that
hides the padding. On a CPU with tiny models a forward pass costs milliseconds of Python
whatever its size, so one pass per item made prefill and scoring most of CoRD's cost
(docs/benchmarks.md); a batch whose logits would be large is split into smaller passes.

Generation: the per-item KV caches from the prefill are left-padded into one batch and
decoded together, one token per step, with explicit position ids and an attention mask
that hides the padding. Finished rows leave the batch and their KV (prompt + generated
tokens) goes into the prefix cache.

Scoring: the items of a task are prefilled together; each item's log-probabilities of
the reference answer are read off its rows of the logits.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from cord.common import prompts
from cord.common.config import ModelSpec
from cord.common.messages import AnswerItem, ExpandItem, FinishReason, Generation, Score, ScoreItem
from cord.common.scoring import predictive_score
from cord.workers.engines import (
    EngineError,
    answer_texts,
    check_context,
    eos_ids,
    expand_texts,
)
from cord.workers.engines.kvcache import KV, PrefixCache, crop_kv

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_STOP_WINDOW = 16  # tokens decoded to look for a stop string that the newest token completed
# Logits elements (rows x new tokens x vocabulary) one batched prefill may produce; a
# larger batch is split. 2**26 floats are 256 MiB: a tiny model's whole task fits in one
# pass, a 150k-vocabulary model's long prompts go a few at a time.
_PREFILL_LOGITS_BUDGET = 2**26
# The fixed cost of one forward pass, in padded tokens: a prefill splits a batch into
# several passes only where that saves more padding than this. (Tiny models on a CPU:
# a pass costs about 4 ms of Python, a token about 50 us.)
_PASS_COST_TOKENS = 64


@dataclass
class _Row:
    """One sequence being generated."""

    index: int  # position in the caller's item list
    prompt: torch.Tensor  # 1-D ids on CPU
    max_new: int
    temperature: float
    top_p: float
    generator: torch.Generator
    cached: int
    stops: tuple[str, ...]
    out: list[int] = field(default_factory=list)
    finish: FinishReason | None = None
    text: str = ""


@dataclass
class _Counters:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    scored_tokens: int = 0
    busy_s: float = 0.0


class HFEngine:
    def __init__(self, spec: ModelSpec) -> None:
        self.name = spec.name
        self.spec = spec
        self.device = torch.device(spec.device)
        if self.device.type == "cpu":
            torch.set_num_threads(spec.cpu_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        dtype = _DTYPES.get(spec.dtype)
        if dtype is None:  # auto: bf16 on CUDA, fp32 on CPU
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        loaded: Any = AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype)
        self.model: Any = loaded.to(self.device)
        self.model.eval()
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        cfg = self.model.config
        self.max_context: int | None = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", None
        )
        self.eos_ids = self._eos_ids()
        self.prefix_cache = PrefixCache(spec.prefix_cache_tokens)
        self.counters = _Counters()
        self._prefix = lru_cache(maxsize=4096)(self._chat_prefix)

    # -- text and tokens ------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        return eos_ids(gen_eos, self.tokenizer.eos_token_id)

    def _chat_prefix(self, user: str) -> str:
        return prompts.chat_prefix(self.tokenizer, user)

    def encode(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def encode_many(self, texts: list[str]) -> list[torch.Tensor]:
        """`encode` for several texts in one tokenizer call (its per-call cost is most of
        a short text's)."""
        if not texts:
            return []
        batch = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [torch.tensor(ids, dtype=torch.long) for ids in batch]

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def _check_context(self, n: int) -> None:
        check_context(self.name, self.max_context, n)

    # -- torch plumbing -------------------------------------------------------------
    def _make_cache(self, kv: KV | None) -> DynamicCache:
        if kv:
            # Contiguous copies: cropped views of stored entries have the strides of the
            # longer entry they came from.
            return DynamicCache(
                [(k.to(self.device).contiguous(), v.to(self.device).contiguous()) for k, v in kv],
                config=self.model.config,
            )
        return DynamicCache(config=self.model.config)

    @staticmethod
    def _kv_of(cache: Any) -> KV:
        if hasattr(cache, "layers"):
            return [(layer.keys, layer.values) for layer in cache.layers]
        return list(zip(cache.key_cache, cache.value_cache, strict=True))

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache
    ) -> tuple[torch.Tensor, Any]:
        out = self.model(
            input_ids=ids.to(self.device),
            position_ids=positions.to(self.device),
            attention_mask=mask.to(self.device),
            use_cache=True,
            **{self._cache_kw: cache},
        )
        new_cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits, new_cache

    def _prefill(self, ids: torch.Tensor, reuse_limit: int) -> tuple[torch.Tensor, Any, int]:
        """Run `ids` on top of its longest cached prefix (at most `reuse_limit` tokens).
        Returns the logits of the new positions, the full cache and the reused length."""
        hit, kv = self.prefix_cache.lookup(ids)
        hit = min(hit, reuse_limit)
        cache = self._make_cache(crop_kv(kv, hit) if kv is not None and hit > 0 else None)
        n = ids.numel()
        logits, cache = self._forward(
            ids[hit:].unsqueeze(0),
            torch.arange(hit, n).unsqueeze(0),
            torch.ones(1, n, dtype=torch.long),
            cache,
        )
        self.counters.prompt_tokens += n
        self.counters.cached_tokens += hit
        return logits[0], cache, hit

    def _prefill_many(
        self, seqs: list[torch.Tensor], reuse_limits: list[int]
    ) -> list[tuple[torch.Tensor, KV, int]]:
        """`_prefill` for several sequences, batched: per sequence the logits of its new
        positions, its KV (cached prefix and new tokens) and the reused length. All
        lookups come before the passes, so one item does not reuse another's new tokens.

        Every row of a pass is as wide as its longest new part, so the rows are sorted by
        new tokens and cut into the passes that cost least: a pass costs
        `_PASS_COST_TOKENS` plus rows x width (one item missing the cache would otherwise
        widen every row of a cache-hitting task)."""
        hits: list[int] = []
        kvs: list[KV | None] = []
        for ids, limit in zip(seqs, reuse_limits, strict=True):
            hit, kv = self.prefix_cache.lookup(ids)
            hit = min(hit, limit)
            hits.append(hit)
            kvs.append(crop_kv(kv, hit) if kv is not None and hit > 0 else None)
        news = [ids.numel() - hit for ids, hit in zip(seqs, hits, strict=True)]
        order = sorted(range(len(seqs)), key=lambda i: news[i])
        out: list[tuple[torch.Tensor, KV, int] | None] = [None] * len(seqs)
        for group in self._passes([news[i] for i in order]):
            rows = [order[g] for g in group]
            done = self._prefill_group(
                [seqs[i] for i in rows], [hits[i] for i in rows], [kvs[i] for i in rows]
            )
            for i, result in zip(rows, done, strict=True):
                out[i] = result
        return [r for r in out if r is not None]

    def _passes(self, widths: list[int]) -> list[list[int]]:
        """Cut ascending `widths` into consecutive groups of least total cost (a group
        costs `_PASS_COST_TOKENS` + size x its last width), each within the logits
        budget unless it is a single row. Returns the groups as index lists."""
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 32_000)
        n = len(widths)
        best = [0.0] + [float("inf")] * n  # best[k]: cost of the first k rows
        cut = [0] * (n + 1)
        for k in range(1, n + 1):
            for j in range(k):  # rows j..k-1 in one pass
                size = k - j
                if size > 1 and size * widths[k - 1] * vocab > _PREFILL_LOGITS_BUDGET:
                    continue
                cost = best[j] + _PASS_COST_TOKENS + size * widths[k - 1]
                if cost < best[k]:
                    best[k], cut[k] = cost, j
        groups: list[list[int]] = []
        k = n
        while k > 0:
            groups.append(list(range(cut[k], k)))
            k = cut[k]
        return groups[::-1]

    def _prefill_group(
        self, seqs: list[torch.Tensor], hits: list[int], kvs: list[KV | None]
    ) -> list[tuple[torch.Tensor, KV, int]]:
        """One forward pass. Row i holds P - hit_i zero pads, its cached prefix (`kvs`,
        hit_i tokens), its s_i new tokens, then S - s_i holes; the mask hides pads and
        holes, which only ever come before a real token's query or after all of them, so
        every real query attends to exactly its own sequence."""
        news = [ids.numel() - hit for ids, hit in zip(seqs, hits, strict=True)]
        width, span = max(hits), max(news)
        rows = len(seqs)
        cache = self._make_cache(self._left_padded(kvs, hits, width) if width else None)
        ids = torch.zeros(rows, span, dtype=torch.long)
        positions = torch.zeros(rows, span, dtype=torch.long)
        mask = torch.zeros(rows, width + span, dtype=torch.long)
        for i, (seq, hit, new) in enumerate(zip(seqs, hits, news, strict=True)):
            ids[i, :new] = seq[hit:]
            # Holes repeat the last position: never beyond the sequence (position tables).
            positions[i] = torch.clamp(torch.arange(hit, hit + span), max=seq.numel() - 1)
            mask[i, width - hit : width + new] = 1
        logits, cache = self._forward(ids, positions, mask, cache)
        layers = self._kv_of(cache)
        out: list[tuple[torch.Tensor, KV, int]] = []
        for i, (seq, hit, new) in enumerate(zip(seqs, hits, news, strict=True)):
            lo, hi = width - hit, width + new
            kv = [(k[i : i + 1, :, lo:hi, :], v[i : i + 1, :, lo:hi, :]) for k, v in layers]
            out.append((logits[i, :new], kv, hit))
            self.counters.prompt_tokens += seq.numel()
            self.counters.cached_tokens += hit
        return out

    def _left_padded(self, kvs: list[KV | None], hits: list[int], width: int) -> KV:
        """The cached prefixes as one batch, each left-padded with zeros to `width`."""
        template = next(kv for kv in kvs if kv is not None)
        layers: KV = []
        for layer, (k0, v0) in enumerate(template):
            keys, values = [], []
            for kv, hit in zip(kvs, hits, strict=True):
                pad = width - hit
                if kv is None:
                    keys.append(k0.new_zeros(1, k0.shape[1], width, k0.shape[-1]))
                    values.append(v0.new_zeros(1, v0.shape[1], width, v0.shape[-1]))
                    continue
                k, v = kv[layer]
                if pad:
                    k = torch.cat([k.new_zeros(1, k.shape[1], pad, k.shape[-1]), k], dim=-2)
                    v = torch.cat([v.new_zeros(1, v.shape[1], pad, v.shape[-1]), v], dim=-2)
                keys.append(k)
                values.append(v)
            layers.append((torch.cat(keys, dim=0), torch.cat(values, dim=0)))
        return layers

    # -- generation -----------------------------------------------------------------
    def expand(self, items: list[ExpandItem]) -> list[Generation]:
        return self._generate_items(items, *expand_texts(self._prefix, items))

    def answer(self, items: list[AnswerItem]) -> list[Generation]:
        return self._generate_items(items, answer_texts(self._prefix, items), [()] * len(items))

    @torch.inference_mode()
    def _generate_items(
        self, items: list[Any], texts: list[str], stops: list[tuple[str, ...]]
    ) -> list[Generation]:
        start = time.perf_counter()
        results: list[Generation | None] = [None] * len(items)
        rows: list[_Row] = []
        encoded = self.encode_many(texts)
        for index, (item, ids, stop) in enumerate(zip(items, encoded, stops, strict=True)):
            try:
                self._check_context(ids.numel() + item.max_new_tokens)
            except EngineError as e:
                results[index] = Generation(key=item.key, error=str(e), retryable=e.retryable)
                continue
            gen = torch.Generator(device=self.device)
            gen.manual_seed(item.seed % (2**63))
            rows.append(
                _Row(index, ids, item.max_new_tokens, item.temperature, item.top_p, gen, 0, stop)
            )
        if rows:
            self._generate(rows)
        for row in rows:
            assert row.finish is not None
            results[row.index] = Generation(
                key=items[row.index].key,
                text=row.text,
                finish=row.finish,
                tokens=len(row.out),
                prompt_tokens=row.prompt.numel(),
                cached_tokens=row.cached,
            )
        self.counters.requests += len(items)
        self.counters.busy_s += time.perf_counter() - start
        return [r for r in results if r is not None]

    def _generate(self, rows: list[_Row]) -> None:
        firsts, caches = [], []
        prefilled = self._prefill_many(
            [r.prompt for r in rows], [r.prompt.numel() - 1 for r in rows]
        )
        for row, (logits, kv, hit) in zip(rows, prefilled, strict=True):
            row.cached = hit
            firsts.append(logits[-1])
            caches.append(kv)
        lens = [r.prompt.numel() for r in rows]
        width = max(lens)
        pads = [width - n for n in lens]
        batched = self._pad_batch(caches, pads)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, pad in enumerate(pads):
            mask[b, pad:] = 1
        positions = torch.tensor(lens, dtype=torch.long)
        logits = torch.stack(firsts)
        active = list(range(len(rows)))  # batch position -> index into rows
        while True:
            tokens = self._sample(logits, [rows[r] for r in active])
            keep: list[int] = []
            for b, (r, token) in enumerate(zip(active, tokens, strict=True)):
                if self._advance(rows[r], token):
                    self._remember(rows[r], batched, b, pads[r])
                else:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                batched.batch_select_indices(index)
                mask = mask[keep]
                positions = positions[keep]
                active = [active[b] for b in keep]
                tokens = [tokens[b] for b in keep]
            mask = torch.cat([mask, torch.ones(len(active), 1, dtype=torch.long)], dim=1)
            step_logits, batched = self._forward(
                torch.tensor(tokens, dtype=torch.long).unsqueeze(1),
                positions.unsqueeze(1),
                mask,
                batched,
            )
            positions = positions + 1
            logits = step_logits[:, -1]

    def _pad_batch(self, caches: list[KV], pads: list[int]) -> DynamicCache:
        layers: KV = []
        for layer in range(len(caches[0])):
            keys, values = [], []
            for kv, pad in zip(caches, pads, strict=True):
                k, v = kv[layer]
                if pad:
                    k = torch.cat([k.new_zeros(*k.shape[:-2], pad, k.shape[-1]), k], dim=-2)
                    v = torch.cat([v.new_zeros(*v.shape[:-2], pad, v.shape[-1]), v], dim=-2)
                keys.append(k)
                values.append(v)
            layers.append((torch.cat(keys, dim=0), torch.cat(values, dim=0)))
        return self._make_cache(layers)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """One token per row, for the whole batch at once (Gumbel-max). Each row draws its
        noise from its own generator, so an item samples the same text whatever batch it
        shares; temperature 0 is argmax; top-p keeps the smallest nucleus above p."""
        logits = logits.float()
        temps = torch.tensor([max(r.temperature, 1e-6) for r in rows], device=logits.device)
        scaled = logits / temps[:, None]
        top_p = torch.tensor([r.top_p for r in rows], device=logits.device)
        if bool((top_p < 1.0).any()):
            sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            outside = torch.cumsum(probs, dim=-1) - probs > top_p[:, None]
            sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
            scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
        noise = torch.stack(
            [
                torch.rand(logits.shape[-1], generator=r.generator, device=logits.device)
                for r in rows
            ]
        )
        gumbel = -torch.log(-torch.log(noise.clamp_(1e-20, 1.0 - 1e-7)))
        greedy = torch.tensor([r.temperature <= 0 for r in rows], device=logits.device)
        choice = torch.where(greedy[:, None], logits, scaled + gumbel)
        return [int(t) for t in torch.argmax(choice, dim=-1).tolist()]

    def _advance(self, row: _Row, token: int) -> bool:
        """Append `token`; True when the row is finished (and its text is final)."""
        if token in self.eos_ids:
            row.finish = "eos"
            row.text = self.decode(row.out)
            return True
        row.out.append(token)
        self.counters.generated_tokens += 1
        if row.stops:
            tail = self.decode(row.out[-_STOP_WINDOW:])
            if any(s in tail for s in row.stops):
                text = self.decode(row.out)
                cut, stop = min((text.find(s), s) for s in row.stops if s in text)
                row.text = text[:cut]
                row.finish = "think_end" if stop == prompts.THINK_CLOSE else "step"
                return True
        if len(row.out) >= row.max_new:
            row.finish = "length"
            row.text = self.decode(row.out)
            return True
        return False

    def _remember(self, row: _Row, batched: Any, b: int, pad: int) -> None:
        """Put a finished row's KV (prompt and the tokens fed back) in the prefix cache."""
        if self.prefix_cache.max_tokens <= 0:
            return
        fed = row.out[:-1] if row.finish != "eos" else row.out
        ids = torch.cat([row.prompt, torch.tensor(fed, dtype=torch.long)])
        kv = [
            (k[b : b + 1, :, pad:, :].clone(), v[b : b + 1, :, pad:, :].clone())
            for k, v in self._kv_of(batched)
        ]
        kv = crop_kv(kv, ids.numel())
        self.prefix_cache.store(ids, kv)

    # -- scoring --------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, items: list[ScoreItem]) -> list[Score]:
        start = time.perf_counter()
        out: list[Score | None] = [None] * len(items)
        ready: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # index, context, target
        contexts = self.encode_many(
            [self._prefix(i.prompt) + prompts.scoring_context(i.steps) for i in items]
        )
        targets = self.encode_many([prompts.answer_target(i.answer) for i in items])
        for index, (item, context, target) in enumerate(zip(items, contexts, targets, strict=True)):
            try:
                self._check_scoring(context, target)
            except EngineError as e:
                out[index] = Score(key=item.key, error=str(e), retryable=e.retryable)
                continue
            ready.append((index, context, target))
        prefilled = self._prefill_many(
            [torch.cat([context, target]) for _, context, target in ready],
            [context.numel() - 1 for _, context, target in ready],
        )
        for (index, context, target), (logits, kv, hit) in zip(ready, prefilled, strict=True):
            logprobs = self._answer_logprobs(context, target, logits, kv, hit)
            out[index] = Score(
                key=items[index].key,
                score=predictive_score(logprobs),
                answer_tokens=len(logprobs),
                prompt_tokens=context.numel() + target.numel(),
                cached_tokens=hit,
            )
        self.counters.requests += len(items)
        self.counters.busy_s += time.perf_counter() - start
        return [s for s in out if s is not None]

    def _scoring_ids(
        self, user: str, steps: list[str], answer: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of the scoring context and of the reference answer after it."""
        context = self.encode(self._prefix(user) + prompts.scoring_context(steps))
        target = self.encode(prompts.answer_target(answer))
        self._check_scoring(context, target)
        return context, target

    def _check_scoring(self, context: torch.Tensor, target: torch.Tensor) -> None:
        if target.numel() == 0:
            raise EngineError("the reference answer is empty under this tokenizer", retryable=False)
        self._check_context(context.numel() + target.numel())

    def _answer_logprobs(
        self, context: torch.Tensor, target: torch.Tensor, logits: torch.Tensor, kv: KV, hit: int
    ) -> list[float]:
        """The answer's log-probabilities from a prefill of context + target (`logits` of
        its new positions); the context's KV goes into the prefix cache."""
        first = context.numel() - 1 - hit  # logits row that predicts target[0]
        picked = logits[first : first + target.numel()].float()
        logprobs = torch.log_softmax(picked, dim=-1).gather(1, target.to(picked.device)[:, None])
        if self.prefix_cache.max_tokens > 0:
            n = context.numel()
            self.prefix_cache.store(
                context, [(k[..., :n, :].clone(), v[..., :n, :].clone()) for k, v in kv]
            )
        self.counters.scored_tokens += target.numel()
        return [float(x) for x in logprobs[:, 0].tolist()]

    @torch.inference_mode()
    def answer_logprobs(
        self, user: str, steps: list[str], answer: str
    ) -> tuple[list[float], int, int]:
        """Log-probabilities of the answer's tokens after the scoring context; also the
        prompt length and how much of it came from the prefix cache."""
        context, target = self._scoring_ids(user, steps, answer)
        ((logits, kv, hit),) = self._prefill_many(
            [torch.cat([context, target])], [context.numel() - 1]
        )
        logprobs = self._answer_logprobs(context, target, logits, kv, hit)
        return logprobs, context.numel() + target.numel(), hit

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "requests": c.requests,
            "prompt_tokens": c.prompt_tokens,
            "cached_tokens": c.cached_tokens,
            "generated_tokens": c.generated_tokens,
            "scored_tokens": c.scored_tokens,
            "busy_s": round(c.busy_s, 3),
            "cache_entries": len(self.prefix_cache),
            "cache_tokens": self.prefix_cache.tokens,
        }

    # -- token ids in, no prompt building (the SGLang test server speaks ids) ------------
    @torch.inference_mode()
    def generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        temperatures: list[float],
        top_ps: list[float],
        seeds: list[int],
        stops: list[tuple[str, ...]],
        stop_token_ids: set[int] | None = None,
    ) -> list[tuple[list[int], FinishReason, int]]:
        """Generate from token ids, batched like `expand`: per prompt the new ids (a stop
        token id not included), the finish reason and the prompt tokens served by the
        prefix cache. `stop_token_ids` end a row as the model's own eos ids do."""
        rows = []
        for index, ids in enumerate(prompts):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seeds[index] % (2**63))
            prompt = torch.tensor(ids, dtype=torch.long)
            self._check_context(prompt.numel() + max_new_tokens[index])
            rows.append(
                _Row(
                    index,
                    prompt,
                    max_new_tokens[index],
                    temperatures[index],
                    top_ps[index],
                    gen,
                    0,
                    stops[index],
                )
            )
        # The decoding loop reads its stop ids from self.eos_ids; widened for this call only.
        eos_ids = self.eos_ids
        self.eos_ids = eos_ids | (stop_token_ids or set())
        try:
            if rows:
                self._generate(rows)
        finally:
            self.eos_ids = eos_ids
        self.counters.requests += len(rows)
        out = []
        for row in rows:
            assert row.finish is not None
            out.append((list(row.out), row.finish, row.cached))
        return out

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], start: int) -> tuple[list[float], int]:
        """Log-probabilities of ids[start + 1:], each given the ids before it, computed as
        `answer_logprobs` does (the cache reused for at most `start` tokens, ids[:start + 1]
        stored); also the prompt tokens served by the prefix cache."""
        full = torch.tensor(ids, dtype=torch.long)
        self._check_context(full.numel())
        logits, cache, hit = self._prefill(full, start)
        picked = logits[start - hit : full.numel() - 1 - hit].float()
        target = full[start + 1 :].to(picked.device)
        logprobs = torch.log_softmax(picked, dim=-1).gather(1, target[:, None])
        if self.prefix_cache.max_tokens > 0:
            kv = [(k.clone(), v.clone()) for k, v in self._kv_of(cache)]
            self.prefix_cache.store(full[: start + 1], crop_kv(kv, start + 1))
        self.counters.scored_tokens += target.numel()
        return logprobs[:, 0].tolist(), hit
