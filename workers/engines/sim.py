"""The `sim` engine: one GPU serving one model, simulated. For cost benchmarks only.

It answers as a server would in time, not in text: the requests in flight share one
continuous batch; a decode pass and a prefill take what the clock says (`simcost`: a
roofline of the pool's `model` shape on its `card`, or a measured CPU server's costs); a
block prefix cache of the card's KV capacity serves what it holds, evicts the least
recently used blocks and makes evicted prefixes be prefilled again; sequences wait while
the cache cannot hold them. Simulated time runs ``time_scale`` times real time, so the
real coordinator, Redis, Celery workers and routing run on top of it: the barrier, the
batching and the admission that price a dataset are the real ones. When the engine's own
thread notices a pass's end late (its Python, on a busy host), the clock is held back by
as much: a card does not lose that time, so the clock does not count it (``lag_s`` does).

Lengths are drawn, seeded by the item's key, from the spec's ranges: a problem's prompt
and its trace length (log-uniform: most traces are short, some run to the top), each
step's tokens, the answer's. A share of candidates (`same_step_share`) write the step
their trajectory's other agreeing candidates write (small teachers often agree), and the
coordinator scores such twins once. A trajectory ends (``</think>``) once its steps reach its
problem's trace length times a factor of its own. Texts are placeholders that carry
their token counts (`` <tag>#<tokens>``): the engine reads its own steps back to know
what a prompt holds. Scores are a hash of the key. The run config refuses this engine
outside the benchmark harness (`cord.common.config.BENCH_ENGINES`): nothing it writes
is data, and no quality figure ever comes from it.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import queue
import re
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cord.common import prompts
from cord.common.messages import (
    AnswerItem,
    EngineStats,
    ExpandItem,
    FinishReason,
    Generation,
    Score,
    ScoreItem,
    SimStats,
)
from cord.common.pools import SimSpec
from cord.workers.engines import Emit
from cord.workers.engines.simcost import (
    SHAPES,
    Clock,
    Measured,
    clock_of,
    kv_capacity_tokens,
)

_TOKENS = re.compile(r"#(\d+)")
Segment = tuple[int, int]  # (content hash, tokens)
# A sequence to run: its prompt, tokens to generate, what it writes.
Part = tuple[list[Segment], int, list[Segment]]
# An item: its sequences (one, or a scoring pass per answer token) and its result to be.
Work = tuple[list[Part], Generation | Score]


def digest(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def unit(*parts: object) -> float:
    """A number in [0, 1) fixed by `parts`."""
    return digest(*parts) / 2**64


def block_keys(segments: Sequence[Segment], block: int, tokens: int | None = None) -> list[int]:
    """The keys of the full blocks of the first `tokens` tokens of `segments`: block k's
    key names everything up to its end, so two sequences share block k exactly when
    their first (k + 1) x block tokens are the same."""
    total = sum(n for _, n in segments) if tokens is None else tokens
    keys: list[int] = []
    chain = 0  # hash of the segments before the current one
    start = 0
    for seg, n in segments:
        end = start + n
        while (len(keys) + 1) * block <= min(end, total):
            keys.append(digest(chain, seg, (len(keys) + 1) * block - start))
        chain = digest(chain, seg)
        start = end
        if start >= total:
            break
    return keys


class BlockCache:
    """KV blocks by key: pinned by running sequences, or cached (least recent first) and
    evictable; and the blocks running sequences hold for what they generate. `evicted`
    remembers what was pushed out, so a prefill of it counts as evicted-prefill."""

    def __init__(self, blocks: int) -> None:
        self.capacity = blocks
        self.cached: OrderedDict[int, None] = OrderedDict()  # unpinned, LRU first
        self.pins: dict[int, int] = {}  # key -> running sequences holding it
        self.private = 0  # blocks of running sequences' own new tokens
        self.evicted: set[int] = set()

    @property
    def used(self) -> int:
        """Blocks running sequences hold (the cached ones can be evicted)."""
        return len(self.pins) + self.private

    def hit_blocks(self, keys: list[int]) -> int:
        n = 0
        for k in keys:
            if k not in self.pins and k not in self.cached:
                break
            n += 1
        return n

    def fits(self, keys: list[int], private: int) -> bool:
        new = sum(1 for k in keys if k not in self.pins)
        return self.used + new + private <= self.capacity

    def pin(self, keys: list[int], private: int) -> None:
        for k in keys:
            if k in self.cached:
                del self.cached[k]
            self.pins[k] = self.pins.get(k, 0) + 1
        self.grow(private)

    def grow(self, blocks: int) -> None:
        self.private += blocks
        self._evict()

    def release(self, keys: list[int], private: int, new_keys: list[int]) -> None:
        """A sequence ended (or was preempted): its prompt blocks and the full blocks it
        wrote (`new_keys`) stay cached until evicted; its other blocks are freed."""
        self.private -= private
        for k in keys:
            left = self.pins[k] - 1
            if left:
                self.pins[k] = left
            else:
                del self.pins[k]
                self.cached[k] = None
        for k in new_keys:
            if k not in self.pins:
                self.cached[k] = None
                self.cached.move_to_end(k)
        self._evict()

    def _evict(self) -> None:
        while self.cached and self.used + len(self.cached) > self.capacity:
            key, _ = self.cached.popitem(last=False)
            self.evicted.add(key)


@dataclass
class Seq:
    """One request in the simulated server."""

    segments: list[Segment]
    new_tokens: int  # tokens it will generate (1 for a scoring pass)
    done: Callable[[Seq], None]
    keys: list[int] = field(default_factory=list)
    written: list[Segment] = field(default_factory=list)  # what it generates, as segments
    private: int = 0  # blocks held for its new tokens
    requests: int = 1  # server requests it opens (0: it rides in another's)
    generated: float = 0.0
    cached_tokens: int = 0
    recompute: int = 0  # tokens its (re-)admission prefills
    again: int = 0  # of those, tokens computed before and evicted (or preempted) since

    @property
    def prompt_tokens(self) -> int:
        return sum(n for _, n in self.segments)

    @property
    def left(self) -> float:
        return self.new_tokens - self.generated


# A process that spins one core for the CPU seconds asked of it, a line at a time.
_BURN = (
    "import sys, time\n"
    "for line in sys.stdin:\n"
    "    end = time.process_time() + float(line)\n"
    "    while time.process_time() < end:\n"
    "        pass\n"
    "    print(flush=True)\n"
)


class Burner:
    """A measured CPU server's passes as CPU work: a process of its own spins a core for
    each slice of a pass. The host's scheduler then shares its cores between the sim
    servers and the fleet's own processes as it would between real CPU servers and the
    fleet: a pass takes longer when the cores are busy."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BURN],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        atexit.register(self.close)

    def burn(self, seconds: float) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{seconds!r}\n")
        self.proc.stdout.readline()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SimServer:
    """The continuous batch, in a thread of its own: admit what the cache can hold, then
    run passes until the next sequence ends, finishes its prefill, or new work comes.

    With `chunk` (a GPU server's chunked prefill: vLLM's max_num_batched_tokens) a pass
    decodes one token of every sequence past its prefill and computes up to the rest of
    the budget of prompt tokens, FIFO; without (`chunk` None: the CPU build) admitted
    prompts are prefilled first, while nothing decodes."""

    def __init__(
        self,
        clock: Clock,
        kv_tokens: int,
        block: int,
        max_seqs: int,
        scale: float,
        chunk: int | None,
        burner: Burner | None = None,
    ):
        self.clock = clock
        self.burner = burner
        self.block = block
        self.max_seqs = max_seqs
        self.scale = scale
        self.chunk = chunk
        self.cache = BlockCache(max(1, kv_tokens // block))
        self.stats = SimStats()
        self._decoded = [0.0, 0.0]  # passes and sequence-steps, parts of passes included
        self.waiting: list[Seq] = []
        self.running: list[Seq] = []
        self._cv = threading.Condition()
        self._run: tuple[str, float, float] | None = None  # (counter, start, length) now
        self._real0 = time.perf_counter()
        # Simulated seconds the clock was held back: whenever the thread noticed a pass's
        # end late (its own Python on a busy host, not the card), the clock took up from
        # the pass's end, not from then. What a GPU would not have lost is not its time.
        self._held_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="cord-sim", daemon=True)
        self._thread.start()

    def submit(self, seqs: list[Seq]) -> None:
        with self._cv:
            self.waiting.extend(seqs)
            self._cv.notify()

    def load(self) -> tuple[int, int, int]:
        """Tokens of KV cache held by running sequences, sequences running, waiting."""
        with self._cv:
            return self.cache.used * self.block, len(self.running), len(self.waiting)

    def snapshot(self) -> SimStats:
        """The counters now, a prefill or decode under way counted up to now."""
        with self._cv:
            stats = self.stats.model_copy()
            run = self._run
        now = self._now_s()
        if run is not None:
            kind, start, seconds = run
            part = min(seconds, max(0.0, now - start))
            stats.busy_s += part
            setattr(stats, kind, getattr(stats, kind) + part)
            stats.clock_s = start + part
        else:
            stats.clock_s = max(stats.clock_s, now)
        return stats

    # -- the clock ------------------------------------------------------------------
    def _now_s(self) -> float:
        """Simulated time now: real time since the start, scaled, less what was held."""
        return (time.perf_counter() - self._real0) / self.scale - self._held_s

    def _real_at(self, t: float) -> float:
        return self._real0 + (t + self._held_s) * self.scale

    def _run_for(self, kind: str, seconds: float, interruptible: bool) -> float:
        """Let `seconds` of simulated time pass prefilling or decoding (`kind`: the
        counter it adds to; called holding the lock); returns how much did: less when
        new work came in (`interruptible`)."""
        if self.burner is not None:
            return self._burned(kind, seconds, interruptible)
        return self._timed(kind, seconds, interruptible)

    BURN_SLICE_S = 0.002  # real CPU seconds between looks for new work

    def _burned(self, kind: str, seconds: float, interruptible: bool) -> float:
        """`_run_for` on a burner: the pass is CPU work, in slices (the lock is let go
        while one burns); the clock follows real time, however long the cores took."""
        assert self.burner is not None
        start = self.stats.clock_s
        self._run = (kind, start, seconds)
        passed = 0.0
        while passed < seconds:
            piece = min(seconds - passed, self.BURN_SLICE_S / self.scale)
            self._cv.release()
            try:
                self.burner.burn(piece * self.scale)
            finally:
                self._cv.acquire()
            passed += piece
            if interruptible and self._can_admit():
                break
        return self._ran(kind, passed, max(start + passed, self._now_s()))

    def _ran(self, kind: str, passed: float, clock_s: float) -> float:
        """`passed` seconds of `kind` done, the clock now at `clock_s`."""
        self._run = None
        self.stats.clock_s = clock_s
        self.stats.busy_s += passed
        setattr(self.stats, kind, getattr(self.stats, kind) + passed)
        return passed

    def _timed(self, kind: str, seconds: float, interruptible: bool) -> float:
        start = self.stats.clock_s
        deadline = self._real_at(start + seconds)
        self._run = (kind, start, seconds)
        passed = seconds
        while True:
            now = time.perf_counter()
            if now >= deadline:
                self.stats.lag_s += now - deadline
                self._held_s += (now - deadline) / self.scale
                break
            if interruptible and self._can_admit():
                passed = min(seconds, max(0.0, self._now_s() - start))
                break
            self._cv.wait(deadline - now)
        return self._ran(kind, passed, start + passed)

    def _room(self) -> bool:
        return len(self.running) < self.max_seqs

    def _blocks(self, generated: float) -> int:
        """Blocks a sequence holds for its prompt's last partial block and `generated`."""
        return math.ceil(generated / self.block) + 1

    def _can_admit(self) -> bool:
        if not self.waiting or not self._room():
            return False
        seq = self.waiting[0]
        return self.cache.fits(seq.keys, self._blocks(seq.generated))

    # -- the loop -------------------------------------------------------------------
    def _loop(self) -> None:
        with self._cv:
            while True:
                if not self.running and not self.waiting:
                    self._cv.wait()
                    # Idle until now: the clock catches up with real time.
                    self.stats.clock_s = max(self.stats.clock_s, self._now_s())
                    continue
                admitted = self._admit()
                if admitted and self.chunk is None:
                    self._prefill(admitted)
                    # The prefill's pass writes each new sequence's first token.
                    for seq in admitted:
                        seq.generated = max(seq.generated, 1.0)
                    for seq in [s for s in admitted if s.left <= 1e-9]:
                        admitted.remove(seq)
                        self._finish(seq)
                self.running.extend(admitted)
                if self.running:
                    self._passes()
                elif self.waiting and not admitted:
                    # Nothing fits and nothing runs: a request larger than the cache.
                    seq = self.waiting.pop(0)
                    seq.generated = seq.new_tokens
                    seq.done(seq)

    def _admit(self) -> list[Seq]:
        admitted = []
        while self.waiting and self._room():
            seq = self.waiting[0]
            keys = seq.keys
            private = self._blocks(seq.generated)
            if not self.cache.fits(keys, private):
                break
            self.waiting.pop(0)
            hit = self.cache.hit_blocks(keys)
            # A prompt is never served whole from the cache: its last token is computed.
            cached = min(hit * self.block, seq.prompt_tokens - 1)
            if not seq.generated:  # a preempted one keeps its first figures
                seq.cached_tokens = cached
            missed = keys[hit:]
            # What a preempted sequence had generated is computed again (vLLM recomputes).
            seq.recompute = seq.prompt_tokens - cached + int(seq.generated)
            seq.again = min(
                seq.recompute,
                int(seq.generated) + self.block * sum(1 for k in missed if k in self.cache.evicted),
            )
            seq.private = private
            self.cache.pin(keys, private)
            admitted.append(seq)
        return admitted

    def _prefill(self, seqs: list[Seq]) -> None:
        """All of `seqs`' prompts at once, nothing decoding meanwhile (no chunking)."""
        tokens = sum(s.recompute for s in seqs)
        context = sum(s.prompt_tokens for s in seqs) // (2 * len(seqs))
        requests = sum(s.requests for s in seqs)
        seconds = self.clock.prefill_s(tokens, context) + self.clock.request_s * requests
        seconds += self.clock.step_s
        self._run_for("prefill_s", seconds, interruptible=False)
        for seq in seqs:
            self._prefilled(seq, seq.recompute)

    def _prefilled(self, seq: Seq, tokens: int) -> None:
        """`tokens` of `seq`'s prompt computed: the evicted part counted first."""
        seq.recompute -= tokens
        again = min(seq.again, tokens)
        seq.again -= again
        self.stats.prefill_tokens += tokens
        self.stats.evicted_prefill_tokens += again

    def _growth(self, decoding: list[Seq], passes: float) -> int:
        """New blocks the decoding sequences need for `passes` more tokens."""
        return sum(max(0, self._blocks(s.generated + passes) - s.private) for s in decoding)

    def _passes(self) -> None:
        """Passes until the next event: a sequence ends or finishes its prefill, the cache
        is full (the latest admitted sequence is preempted when not one pass fits), or
        new work can be admitted."""
        while True:
            decoding = [s for s in self.running if not s.recompute]
            filling = [s for s in self.running if s.recompute]
            budget = max(1, (self.chunk or 0) - len(decoding))
            fill = min(budget, sum(s.recompute for s in filling)) if filling else 0
            passes = math.ceil(min(s.left for s in decoding)) if decoding else 0
            if filling:  # the front prompt's prefill ends
                first = math.ceil(filling[0].recompute / fill)
                passes = min(passes, first) if passes else first
            room = self.cache.capacity - self.cache.used
            if self._growth(decoding, passes) <= room:
                break
            lo, hi = 0, passes  # the most passes that fit: growth rises with passes
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if self._growth(decoding, mid) <= room else (lo, mid - 1)
            if lo:
                passes = lo
                break
            if len(self.running) == 1:  # alone and still too long for the cache: cut
                seq = self.running.pop()
                seq.new_tokens = max(1, int(seq.generated))
                self._finish(seq)
                return
            self._preempt(self.running.pop())  # the latest admitted, as vLLM does
        kv = sum(s.prompt_tokens + int(s.generated) for s in decoding)
        context = sum(s.prompt_tokens for s in filling) // (2 * len(filling)) if filling else 0
        per_pass = self.clock.pass_s(len(decoding), kv, fill, context)
        kind = "decode_s" if decoding else "prefill_s"
        passed = self._run_for(kind, per_pass * passes, interruptible=True)
        done = passes if passed >= per_pass * passes else passed / per_pass
        if decoding:  # counted whole, an interrupted pass's part carried to the next
            self._decoded[0] += done
            self._decoded[1] += done * len(decoding)
            self.stats.decode_passes = math.floor(self._decoded[0] + 1e-6)
            self.stats.decode_seq_steps = math.floor(self._decoded[1] + 1e-6)
        left = int(done * fill)
        for seq in filling:
            took = min(seq.recompute, left)
            self._prefilled(seq, took)
            left -= took
        ended = []
        for seq in decoding:
            seq.generated += done
            grown = self._blocks(seq.generated) - seq.private
            if grown > 0:
                seq.private += grown
                self.cache.grow(grown)
            if seq.left <= 1e-9:
                ended.append(seq)
        for seq in ended:
            self.running.remove(seq)
            self._finish(seq)

    def _preempt(self, seq: Seq) -> None:
        """Out of blocks: `seq` gives its blocks back and waits to be computed again."""
        self.cache.release(seq.keys, seq.private, [])
        seq.private = 0
        self.waiting.insert(0, seq)
        self.stats.preemptions += 1

    def _finish(self, seq: Seq) -> None:
        whole = [*seq.segments, *seq.written]
        total = seq.prompt_tokens + seq.new_tokens
        written = block_keys(whole, self.block, total)[len(seq.keys) :]
        self.cache.release(seq.keys, seq.private, written)
        seq.done(seq)


class SimEngine:
    """The engine interface over one `SimServer`; several tasks call it at once
    (``concurrency``), each waiting for its own sequences."""

    streams = True  # finished items are handed over as they finish (`serve`'s emit)

    def __init__(self, spec: SimSpec) -> None:
        assert spec.model is not None
        self.name = spec.name
        self.spec = spec
        if spec.decode_s is not None and spec.prefill_token_s is not None:
            # A measured CPU server: its own costs, no chunked prefill (the CPU build's).
            base, per_seq, *per_kv = spec.decode_s
            clock: Clock = Measured(
                base, per_seq, per_kv[0] if per_kv else 0.0, spec.prefill_token_s, spec.request_s
            )
            kv, max_seqs, chunk = spec.kv_tokens or 1_000_000, 256, None
        else:
            roofline = clock_of(spec.card, spec.model)
            card = roofline.card
            clock = roofline
            kv = spec.kv_tokens or kv_capacity_tokens(card, SHAPES[spec.model])
            max_seqs, chunk = card.max_seqs, card.batched_tokens
        self.kv_tokens = kv
        burner = Burner() if spec.burn_cpu else None
        self.server = SimServer(
            clock, kv, spec.block_tokens, spec.max_seqs or max_seqs, spec.time_scale, chunk, burner
        )
        self.counters = EngineStats(engine="sim", kv_capacity_tokens=kv)
        self._lock = threading.Lock()

    # -- lengths ----------------------------------------------------------------------
    def _range(self, bounds: tuple[int, int], *key: object) -> int:
        lo, hi = bounds
        return lo + int(unit(*key) * (hi - lo + 1))

    def _trace_tokens(self, prompt: str, key: str, whole: bool) -> int:
        """The problem's trace length (log-uniform over the range: `whole_trace_tokens`
        for a trajectory written whole, where set), times the trajectory's own factor
        (0.8-1.2)."""
        lo, hi = (self.spec.whole_trace_tokens if whole else None) or self.spec.trace_tokens
        base = lo * (hi / lo) ** unit("trace", prompt)
        return int(base * (0.8 + 0.4 * unit("own", key)))

    def _context(self, prompt: str, steps: list[str]) -> list[Segment]:
        question = (digest("q", prompt), self._range(self.spec.prompt_tokens, "q", prompt))
        return [question, *((digest(s), step_tokens(s)) for s in steps)]

    # -- the engine interface ---------------------------------------------------------
    def expand(self, items: list[ExpandItem], emit: Emit | None = None) -> list[Generation]:
        work: list[Work] = []
        for item in items:
            so_far = sum(step_tokens(s) for s in item.steps)
            # The step every agreeing candidate on this trajectory writes, or its own.
            agrees = not item.whole and unit("same", item.key) < self.spec.same_step_share
            own = digest("same", item.prompt, *item.steps) if agrees else item.key
            goal = self._trace_tokens(item.prompt, str(own), item.whole)
            tag = f"{digest(own) % 1_000_000:06d}"
            finish: FinishReason
            if item.whole:  # steps until the trajectory's length: one text with headers
                lengths: list[int] = []
                total = so_far
                while total < goal or not lengths:
                    lengths.append(self._range(self.spec.step_tokens, item.key, len(lengths)))
                    total += lengths[-1]
                bodies = [f" {tag}#{n}" for n in lengths]
                text = bodies[0] + "".join(
                    f"\n{prompts.step_header(item.next_step + k)}{b}"
                    for k, b in enumerate(bodies[1:], start=1)
                )
                tokens, finish = sum(lengths), "think_end"
            else:
                tokens = self._range(self.spec.step_tokens, own)
                bodies = [f" {tag}#{tokens}"]
                text = bodies[0]
                finish = "think_end" if so_far + tokens >= goal else "step"
            if tokens >= item.max_new_tokens:
                tokens, finish = item.max_new_tokens, "length"
            plan = Generation(key=item.key, text=text, finish=finish, tokens=tokens)
            # As the next prompts will hold them: a step of a whole trajectory keeps its
            # header (the coordinator splits the text at them).
            steps = (
                [f"{prompts.step_header(item.next_step + k)}{b}" for k, b in enumerate(bodies)]
                if item.whole
                else bodies
            )
            written = [(digest(t), step_tokens(t)) for t in steps]
            work.append(([(self._context(item.prompt, item.steps), tokens, written)], plan))
        return self._run(work, emit)

    def answer(self, items: list[AnswerItem], emit: Emit | None = None) -> list[Generation]:
        close = (digest("</think>"), 2)
        work: list[Work] = []
        for i in items:
            n = min(self.spec.answer_tokens, i.max_new_tokens)
            plan = Generation(key=i.key, text=" The final answer is 0.", finish="eos", tokens=n)
            work.append(([([*self._context(i.prompt, i.steps), close], n, [])], plan))
        return self._run(work, emit)

    def score(self, items: list[ScoreItem], emit: Emit | None = None) -> list[Score]:
        n = self.spec.answer_tokens
        work: list[Work] = []
        for i in items:
            plan = Score(
                key=i.key, score=(digest(i.key) % 1_000_000 + 1) / 1_000_002, answer_tokens=n
            )
            context = self._context(i.prompt, i.steps)
            answer = digest("a", i.answer)
            if self.spec.score_passes == "one":
                # The context and the reference answer in one pass (its log-probs).
                parts: list[Part] = [([*context, (answer, n)], 1, [])]
            else:
                # As the vLLM engine scores: one prompt per answer position j (the
                # context and the answer's first j tokens), all in one request.
                parts = [([*context, (answer, j)] if j else context, 1, []) for j in range(n)]
            work.append((parts, plan))
        return self._run(work, emit)

    def _run(self, work: list[Work], emit: Emit | None) -> list[Any]:
        """The sequences of every item, all submitted at once; returns each item's
        planned result with what its prompts cost. With `emit`, results go out as their
        items' last sequences end (what ends together goes together)."""
        finished: queue.Queue[tuple[int, Seq]] = queue.Queue()
        seqs = []
        for index, (parts, _) in enumerate(work):

            def done(seq: Seq, index: int = index) -> None:
                finished.put((index, seq))

            for k, (segments, new, written) in enumerate(parts):
                keys = block_keys(segments, self.spec.block_tokens)
                seqs.append(Seq(segments, max(1, new), done, keys, written, requests=int(k == 0)))
        self.server.submit(seqs)
        out: list[Any] = [None] * len(work)
        pending = [len(parts) for parts, _ in work]
        cost = [[0, 0] for _ in work]  # prompt and cached tokens so far
        left = len(work)
        while left:
            ended = [finished.get()]
            while True:
                try:
                    ended.append(finished.get_nowait())
                except queue.Empty:
                    break
            ready = []
            for index, seq in ended:
                cost[index][0] += seq.prompt_tokens
                cost[index][1] += seq.cached_tokens
                pending[index] -= 1
                if pending[index]:
                    continue
                prompt, cached = cost[index]
                out[index] = work[index][1].model_copy(
                    update={"prompt_tokens": prompt, "cached_tokens": cached}
                )
                ready.append(out[index])
            left -= len(ready)
            self._count(ready)
            if emit is not None and left and ready:
                emit(ready)
        return out

    def _count(self, results: list[Any]) -> None:
        with self._lock:
            tokens = self.counters.tokens
            for r in results:
                self.counters.requests += 1
                tokens.prompt += r.prompt_tokens
                tokens.cached += r.cached_tokens
                if isinstance(r, Score):
                    tokens.scored += r.answer_tokens
                else:
                    tokens.generated += r.tokens

    def stats(self) -> EngineStats:
        with self._lock:
            stats = self.counters.model_copy(deep=True)
        sim = self.server.snapshot()
        stats.sim = sim
        stats.kv_used_tokens, stats.requests_running, stats.requests_waiting = self.server.load()
        stats.busy_s = round(sim.busy_s * self.spec.time_scale, 3)
        stats.busy_wall_s = stats.busy_s
        return stats


def step_tokens(text: str) -> int:
    """Tokens of a step the engine wrote (its text carries them); another text: about
    four characters a token."""
    found = _TOKENS.findall(text)
    return sum(int(n) for n in found) if found else max(1, len(text) // 4)
