"""The `hf` engine: transformers + torch, on CPU or CUDA, inside the worker. The base
(`base.BaseEngine`) builds prompts, cuts stop strings and computes S; this module
generates from token ids and computes the answer's log-probabilities.

- Batched generation with stop strings (``### Step`` / ``</think>``) and per-item seeds,
  so a re-dispatched item reproduces its text.
- Log-probabilities of given tokens (the reference answer) for the meta-prover's score.
- Each model's own chat template and tokenizer; trajectories arrive as text.
- A prefix KV cache (`kvcache.PrefixCache`): each request reuses the longest cached
  prefix of its token ids and reports how many prompt tokens came from it.

Prefill (`_prefill_in_slabs`): the items of a task run in as few forward passes as pay,
each on top of its own cached prefix, straight into per-layer slabs that hold the whole
batch and room for the whole decode (`decoding.SlabLayer`): each row's cached prefix is copied in
once from the prefix cache, each pass writes its rows' new tokens in place (all passes
end at one column; a row shorter than its pass's longest leaves masked holes), with
explicit position ids and an attention mask that hides pads and holes. On a CPU with
tiny models a forward pass costs milliseconds of Python whatever its size, so one pass
per item made prefill and scoring most of CoRD's cost (docs/benchmarks.md); rows are
grouped into passes by their new tokens (`_passes`), and a batch whose logits would be
large is split. A model whose cache layers are not plain full-attention ones (sliding
windows) prefills into a padded batch of its own (`_prefill_passes`) that is then
copied, realigned, into slabs (`_joined`).

Generation: the rows decode together, one token per step written in place into the
slabs. Finished rows leave the batch and their KV (prompt + generated tokens) goes into
the prefix cache. transformers' `DynamicCache` copies every layer's whole KV on
construction and on every decode step; the engine avoids both (about a fifth of CoRD's
engine time on the lab's models), and prefilling in place avoids three more copies of
every cached prefix (a padded batch, each pass's own cache, a realigned slab).

Scoring: the items of a task are prefilled together; each item's log-probabilities of
the reference answer are read off its rows of the logits.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

from cord.common.pools import HFSpec
from cord.workers.engines.base import (
    AnswerLogprobs,
    BaseEngine,
    Done,
    EngineError,
    IdOutput,
    IdRequest,
)
from cord.workers.engines.decoding import Pass, Row, Sampling, SlabLayer, sample
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


class HFEngine(BaseEngine):
    def __init__(self, spec: HFSpec) -> None:
        super().__init__(spec)
        self.device = torch.device(spec.device)
        if self.device.type == "cpu":
            torch.set_num_threads(spec.cpu_threads)
        dtype = _DTYPES.get(spec.dtype)
        if dtype is None:  # auto: bf16 on CUDA, fp32 on CPU
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        loaded: Any = AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype)
        self.model: Any = loaded.to(self.device)
        self.model.eval()
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.prefix_cache = PrefixCache(spec.prefix_cache_tokens)
        self._stop_ids = self.eos_ids  # what ends a row: eos ids and a request's stop ids
        self._enders: dict[tuple[str, ...], frozenset[int]] = {}  # see `_may_end`
        # Generation prefills into decoding slabs where every cache layer is a plain
        # one (full attention); (heads, head dim) of each layer's keys and values.
        probe = DynamicCache(config=self.model.config)
        self._kv_shape = self._kv_shapes()
        self._slabs = all(type(layer) is DynamicLayer for layer in probe.layers) and len(
            probe.layers
        ) == len(self._kv_shape)

    # -- torch plumbing -------------------------------------------------------------
    @torch.inference_mode()
    def _kv_shapes(self) -> list[tuple[int, int]]:
        """(heads, head dim) of each layer's cached keys, from one token's forward."""
        cache = DynamicCache(config=self.model.config)
        one = torch.zeros(1, 1, dtype=torch.long)
        self._forward(one, one, torch.ones(1, 1, dtype=torch.long), cache)
        return [(int(k.shape[1]), int(k.shape[-1])) for k, _ in self._kv_of(cache)]

    def _make_cache(self, kv: KV | None) -> DynamicCache:
        """A DynamicCache holding `kv` as it is: `DynamicCache(kv)` would copy every
        layer (its first `update` concatenates onto an empty tensor), a full copy of the
        batch's KV per pass for nothing."""
        cache = DynamicCache(config=self.model.config)
        if not kv:
            return cache
        for index, (k, v) in enumerate(kv):
            # Contiguous: cropped views of stored entries have the strides of the longer
            # entry they came from.
            k, v = k.to(self.device).contiguous(), v.to(self.device).contiguous()
            layer = cache.layers[index] if index < len(cache.layers) else None
            if type(layer) is DynamicLayer:
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            else:  # another layer type (sliding window, ...): its own update
                cache.update(k, v, index)
        return cache

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

    def _prefill_passes(self, seqs: list[torch.Tensor], reuse_limits: list[int]) -> list[Pass]:
        """Run each sequence on top of its longest cached prefix (at most its reuse
        limit), in as few forward passes as pay. All lookups come before the passes, so
        one item does not reuse another's new tokens.

        Every row of a pass is as wide as its longest new part, so the rows are sorted by
        new tokens and cut into the passes that cost least: a pass costs
        `_PASS_COST_TOKENS` plus rows x width (one item missing the cache would otherwise
        widen every row of a cache-hitting task)."""
        hits, kvs = self._lookups(seqs, reuse_limits)
        news = [ids.numel() - hit for ids, hit in zip(seqs, hits, strict=True)]
        order = sorted(range(len(seqs)), key=lambda i: news[i])
        passes = []
        for group in self._passes([news[i] for i in order]):
            rows = [order[g] for g in group]
            passes.append(
                self._prefill_group(
                    rows, [seqs[i] for i in rows], [hits[i] for i in rows], [kvs[i] for i in rows]
                )
            )
        return passes

    def _lookups(
        self, seqs: list[torch.Tensor], reuse_limits: list[int]
    ) -> tuple[list[int], list[KV | None]]:
        """Each sequence's longest cached prefix (at most its reuse limit): its length
        and its KV, cropped to it. All lookups come before any pass, so one item does
        not reuse another's new tokens."""
        hits: list[int] = []
        kvs: list[KV | None] = []
        for ids, limit in zip(seqs, reuse_limits, strict=True):
            hit, kv = self.prefix_cache.lookup(ids)
            hit = min(hit, limit)
            hits.append(hit)
            kvs.append(crop_kv(kv, hit) if kv is not None and hit > 0 else None)
        return hits, kvs

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
        self, rows: list[int], seqs: list[torch.Tensor], hits: list[int], kvs: list[KV | None]
    ) -> Pass:
        """One forward pass. Row i holds P - hit_i zero pads, its cached prefix (`kvs`,
        hit_i tokens), its s_i new tokens, then S - s_i holes; the mask hides pads and
        holes, which only ever come before a real token's query or after all of them, so
        every real query attends to exactly its own sequence."""
        news = [ids.numel() - hit for ids, hit in zip(seqs, hits, strict=True)]
        width, span = max(hits), max(news)
        n = len(seqs)
        cache = self._make_cache(self._left_padded(kvs, hits, width) if width else None)
        ids = torch.zeros(n, span, dtype=torch.long)
        positions = torch.zeros(n, span, dtype=torch.long)
        mask = torch.zeros(n, width + span, dtype=torch.long)
        for i, (seq, hit, new) in enumerate(zip(seqs, hits, news, strict=True)):
            ids[i, :new] = seq[hit:]
            # Holes repeat the last position: never beyond the sequence (position tables).
            positions[i] = torch.clamp(torch.arange(hit, hit + span), max=seq.numel() - 1)
            mask[i, width - hit : width + new] = 1
        logits, cache = self._forward(ids, positions, mask, cache)
        return Pass(rows, logits, self._kv_of(cache), width, hits, news)

    def _left_padded(self, kvs: list[KV | None], hits: list[int], width: int) -> KV:
        """The cached prefixes as one batch, each left-padded with zeros to `width`."""
        template = next(kv for kv in kvs if kv is not None)
        layers: KV = []
        for layer, (k0, v0) in enumerate(template):
            shape = (len(kvs), k0.shape[1], width, k0.shape[-1])
            keys, values = k0.new_zeros(shape), v0.new_zeros(shape)
            for i, (kv, hit) in enumerate(zip(kvs, hits, strict=True)):
                if kv is not None and hit:
                    keys[i, :, width - hit :] = kv[layer][0][0]
                    values[i, :, width - hit :] = kv[layer][1][0]
            layers.append((keys, values))
        return layers

    # -- generation -----------------------------------------------------------------
    @torch.inference_mode()
    def generate_ids(
        self,
        requests: list[IdRequest],
        stop_ids: set[int] | None = None,
        done: Done | None = None,  # not called: the rows of a task decode together
    ) -> list[IdOutput | EngineError]:
        """Generate from token ids, all requests decoding together (`_generate`); each
        row draws from its own generator, seeded by its request, so an item samples the
        same text whatever batch it shares. `stop_ids` end a row as the model's own
        end-of-turn ids do (the SGLang test server's `stop_token_ids`)."""
        rows = []
        for index, r in enumerate(requests):
            gen = torch.Generator(device=self.device)
            gen.manual_seed(r.seed % (2**63))
            prompt = torch.tensor(r.ids, dtype=torch.long)
            rows.append(Row(index, prompt, r.max_new, r.temperature, r.top_p, gen, 0, r.stops))
        self._stop_ids = self.eos_ids | (stop_ids or set())
        if rows:
            self._generate(rows)
        return [
            IdOutput(list(r.out), r.prompt.numel(), r.cached, eos=r.finish == "eos") for r in rows
        ]

    def _generate(self, rows: list[Row]) -> None:
        """Prefill `rows` into decoding slabs (`_prefill_in_slabs`, or where the model's
        cache layers are not plain ones, `_prefill_passes` then `_joined`), then decode
        them together until each finishes."""
        room = max(r.max_new for r in rows)
        seqs, limits = [r.prompt for r in rows], [r.prompt.numel() - 1 for r in rows]
        if self._slabs:
            passes, slabs, end = self._prefill_in_slabs(seqs, limits, room)
            batched = DynamicCache(config=self.model.config)
            batched.layers = [SlabLayer(k, v, end) for k, v in slabs]
            mask = torch.zeros(len(rows), end, dtype=torch.long)
            segments = [range(*p.segment(j)) for p in passes for j in range(len(p.rows))]
            for b, cols in enumerate(segments):
                mask[b, cols.start : cols.stop] = 1
        else:
            passes = self._prefill_passes(seqs, limits)
            batched, mask, segments = self._joined(passes, room)
        firsts = []
        order: list[int] = []  # batch position -> index into rows
        for p in passes:
            for j, r in enumerate(p.rows):
                rows[r].cached = p.hits[j]
                firsts.append(p.logits[j, p.news[j] - 1])
                order.append(r)
        start = mask.shape[1]  # the column of the first fed-back token, every row
        positions = torch.tensor([rows[r].prompt.numel() for r in order], dtype=torch.long)
        logits = torch.stack(firsts)
        active = order
        seg = dict(zip(order, segments, strict=True))
        params = Sampling.of([rows[r] for r in active], logits.device)
        while True:
            tokens = sample(logits, [rows[r] for r in active], params)
            keep: list[int] = []
            for b, (r, token) in enumerate(zip(active, tokens, strict=True)):
                if self._advance(rows[r], token):
                    self._remember(rows[r], batched, b, seg[r], start)
                else:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep, device=self.device)
                batched.batch_select_indices(index)
                mask = mask[keep]
                positions = positions[keep]
                params = params.select(index)
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

    def _prefill_in_slabs(
        self, seqs: list[torch.Tensor], reuse_limits: list[int], room: int
    ) -> tuple[list[Pass], KV, int]:
        """Prefill each sequence on top of its longest cached prefix straight into slabs
        (`SlabLayer`) that hold the whole batch, in as few forward passes as pay
        (`_passes`). Every pass writes its rows' new tokens at the same columns, ending
        at column E (the same for all passes: the largest of a pass's longest hit plus
        its longest new part), each row's cached prefix right before them; a row with
        fewer new tokens than its pass's longest leaves holes after them. Zero pads come
        first and `room` columns after E to decode into; masks hide pads and holes. So
        the prefix KV is copied once, from the cache into the slab: `_prefill_passes`
        and `_joined` copied it three times more (a padded batch, each pass's own cache,
        a realigned slab), most of CoRD's engine cost beyond the model.

        Returns the passes (their `layers` are views of the slabs, rows in pass order),
        the slabs (per layer, keys and values) and E."""
        hits, kvs = self._lookups(seqs, reuse_limits)
        news = [ids.numel() - hit for ids, hit in zip(seqs, hits, strict=True)]
        order = sorted(range(len(seqs)), key=lambda i: news[i])
        groups = [[order[g] for g in group] for group in self._passes([news[i] for i in order])]
        spans = [max(news[i] for i in group) for group in groups]
        end = max(max(hits[i] for i in g) + span for g, span in zip(groups, spans, strict=True))
        template = next(iter(self.model.parameters()))
        shape = (len(seqs), end + room)
        slabs: KV = [
            (
                template.new_zeros(shape[0], h, shape[1], d),
                template.new_zeros(shape[0], h, shape[1], d),
            )
            for h, d in self._kv_shape
        ]
        passes: list[Pass] = []
        lo = 0  # the pass's first batch row
        for group, span in zip(groups, spans, strict=True):
            at = end - span  # where the pass's new tokens start, every row
            hi = lo + len(group)
            ids = torch.zeros(len(group), span, dtype=torch.long)
            positions = torch.zeros(len(group), span, dtype=torch.long)
            mask = torch.zeros(len(group), end, dtype=torch.long)
            for j, i in enumerate(group):
                seq, hit, kv = seqs[i], hits[i], kvs[i]
                if kv is not None and hit:
                    for (keys, values), (k, v) in zip(slabs, kv, strict=True):
                        keys[lo + j, :, at - hit : at] = k[0]
                        values[lo + j, :, at - hit : at] = v[0]
                ids[j, : news[i]] = seq[hit:]
                # Holes repeat the last position: never beyond the sequence.
                positions[j] = torch.clamp(torch.arange(hit, hit + span), max=seq.numel() - 1)
                mask[j, at - hit : at + news[i]] = 1
            views = [(k[lo:hi], v[lo:hi]) for k, v in slabs]
            cache = DynamicCache(config=self.model.config)
            cache.layers = [SlabLayer(k, v, at) for k, v in views]
            logits, _ = self._forward(ids, positions, mask, cache)
            passes.append(
                Pass(group, logits, views, at, [hits[i] for i in group], [news[i] for i in group])
            )
            lo = hi
        return passes, slabs, end

    def _joined(
        self, passes: list[Pass], room: int
    ) -> tuple[DynamicCache, torch.Tensor, list[range]]:
        """The passes' KV as one left-padded batch (rows in pass order, each row's
        tokens right-aligned, so decoding appends at one column for all), in slabs with
        `room` more columns to decode into (`SlabLayer`). Also its attention mask and
        each row's prompt columns."""
        lens = [h + n for p in passes for h, n in zip(p.hits, p.news, strict=True)]
        total, n = max(lens), len(lens)
        mask = torch.zeros(n, total, dtype=torch.long)
        segments = []
        for b, length in enumerate(lens):
            mask[b, total - length :] = 1
            segments.append(range(total - length, total))
        cache = DynamicCache(config=self.model.config)
        slabs = all(type(layer) is DynamicLayer for layer in cache.layers) and len(
            cache.layers
        ) == len(passes[0].layers)
        width = total + room if slabs else total
        layers: KV = []
        for k0, v0 in passes[0].layers:
            shape = (n, k0.shape[1], width, k0.shape[-1])
            layers.append((k0.new_zeros(shape), v0.new_zeros(shape)))
        b = 0
        for p in passes:  # one copy per row and layer, straight into place
            for j in range(len(p.rows)):
                lo, hi = p.segment(j)
                for (keys, values), (k, v) in zip(layers, p.layers, strict=True):
                    keys[b, :, total - (hi - lo) : total] = k[j, :, lo:hi]
                    values[b, :, total - (hi - lo) : total] = v[j, :, lo:hi]
                b += 1
        if not slabs:
            return self._make_cache(layers), mask, segments
        cache.layers = [SlabLayer(k, v, total) for k, v in layers]
        return cache, mask, segments

    def _may_end(self, stops: tuple[str, ...]) -> frozenset[int]:
        """The ids after which a stop string of `stops` may show: a stop string first
        appears with the token that holds its last character, so only those tokens (and
        any whose text alone is empty or a broken character) need the tail decoded.
        Decoding the tail after every token was a tenth of a tiny model's decode time."""
        found = self._enders.get(stops)
        if found is None:
            lasts = {s[-1] for s in stops if s}
            ids = range(len(self.tokenizer))
            with self._tokenizer_lock:
                texts = self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)
            found = frozenset(
                i
                for i, text in zip(ids, texts, strict=True)
                if not text or "\ufffd" in text or any(c in text for c in lasts)
            )
            self._enders[stops] = found
        return found

    def _advance(self, row: Row, token: int) -> bool:
        """Append `token`; True when the row is finished (the base cuts its text)."""
        if token in self._stop_ids:
            row.finish = "eos"
            return True
        row.out.append(token)
        if row.stops and token in self._may_end(row.stops):
            tail = self.decode(row.out[-_STOP_WINDOW:])
            if any(s in tail for s in row.stops):
                row.finish = "step"  # the base tells a step from </think>
                return True
        if len(row.out) >= row.max_new:
            row.finish = "length"
            return True
        return False

    def _remember(self, row: Row, batched: Any, b: int, prompt: range, start: int) -> None:
        """Put a finished row's KV (prompt and the tokens fed back) in the prefix cache:
        its prompt columns and its columns from `start` on (batch position `b`): one run
        of columns where the prompt ends at `start`, else two (holes between)."""
        if self.prefix_cache.max_tokens <= 0:
            return
        fed = row.out[:-1] if row.finish != "eos" else row.out
        ids = torch.cat([row.prompt, torch.tensor(fed, dtype=torch.long)])
        end = start + len(fed)
        kv = [
            (self._columns(k, b, prompt, start, end), self._columns(v, b, prompt, start, end))
            for k, v in self._kv_of(batched)
        ]
        self.prefix_cache.store(ids, kv)

    @staticmethod
    def _columns(t: torch.Tensor, b: int, prompt: range, start: int, end: int) -> torch.Tensor:
        """Batch row `b`'s `prompt` columns and its columns `start:end`, as a new tensor."""
        if prompt.stop == start:
            return t[b : b + 1, :, prompt.start : end].clone()
        return torch.cat(
            [t[b : b + 1, :, prompt.start : prompt.stop], t[b : b + 1, :, start:end]], 2
        )

    # -- scoring --------------------------------------------------------------------
    @torch.inference_mode()
    def answer_logprobs(
        self, pairs: list[tuple[list[int], list[int]]]
    ) -> list[AnswerLogprobs | EngineError]:
        tensors = [
            (torch.tensor(c, dtype=torch.long), torch.tensor(t, dtype=torch.long)) for c, t in pairs
        ]
        scored = self._answers_logprobs(tensors) if tensors else []
        return [
            AnswerLogprobs(values, len(c) + len(t), hit)
            for (c, t), (values, hit) in zip(pairs, scored, strict=True)
        ]

    def _answers_logprobs(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> list[tuple[list[float], int]]:
        """Per (context, answer) pair: the answer's log-probabilities after the context,
        and the prompt tokens the prefix cache served. One prefill of context + answer
        per pair, batched (`_prefill_in_slabs`); the log-softmax runs once per pass over
        every answer position in it; each context's KV goes into the prefix cache."""
        out: list[tuple[list[float], int] | None] = [None] * len(pairs)
        seqs = [torch.cat([c, t]) for c, t in pairs]
        limits = [c.numel() - 1 for c, _ in pairs]
        if self._slabs:
            passes = self._prefill_in_slabs(seqs, limits, 0)[0]
        else:
            passes = self._prefill_passes(seqs, limits)
        for p in passes:
            rows: list[int] = []
            cols: list[int] = []
            for j, i in enumerate(p.rows):
                context, target = pairs[i]
                first = context.numel() - 1 - p.hits[j]  # the column predicting target[0]
                rows += [j] * target.numel()
                cols += range(first, first + target.numel())
            targets = torch.cat([pairs[i][1] for i in p.rows]).to(p.logits.device)
            device = p.logits.device
            picked = p.logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
            picked = picked.float()
            logprobs = torch.log_softmax(picked, dim=-1).gather(1, targets[:, None])[:, 0].tolist()
            at = 0
            for j, i in enumerate(p.rows):
                context, target = pairs[i]
                out[i] = ([float(x) for x in logprobs[at : at + target.numel()]], p.hits[j])
                at += target.numel()
                if self.prefix_cache.max_tokens > 0:
                    lo, n = p.segment(j)[0], context.numel()
                    kv = [
                        (k[j : j + 1, :, lo : lo + n].clone(), v[j : j + 1, :, lo : lo + n].clone())
                        for k, v in p.layers
                    ]
                    self.prefix_cache.store(context, kv)
        return [r for r in out if r is not None]

    def runtime_stats(self) -> dict[str, Any]:
        return {"cache_entries": len(self.prefix_cache), "cache_tokens": self.prefix_cache.tokens}
