"""One engine's scheduler, step by step, the way vLLM's (V1) schedules: continuous batching with chunked prefill.

Every step has a token budget (``max_num_batched_tokens``). Running sequences are served first, in the order
they were admitted: a decoding sequence takes one token, a sequence still in prefill takes the rest of its
prompt (or what the budget leaves: chunked prefill shares the step with the decodes). Then waiting sequences
are admitted first-come first-served while the budget, ``max_num_seqs`` and free KV blocks allow. KV is held
in blocks of ``block_tokens``; a sequence that needs a block when none is free preempts the most recently
admitted running sequence, which goes back to the front of the queue and later recomputes its prompt and
the tokens it had generated (vLLM's recompute preemption). The step that completes a prefill samples the
sequence's next token (its first token, unless it was preempted after generating).

A run of decode-only steps in which nothing can change the batch (no prefill, nothing admissible, no
sequence finishing, no block missing) is returned as one segment of ``steps`` steps, so the simulator skips
over it in one event; its cost grows by one KV token per sequence per step (``hardware.decode_run_time``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from simulator.hardware import Batch


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # vLLM's default for GPUs
    max_num_batched_tokens: int = 2048  # vLLM V1's default token budget for online serving with chunked prefill
    block_tokens: int = 16


@dataclass(eq=False)
class Seq:
    rid: int
    input_tokens: int
    output_tokens: int
    computed: int = 0  # tokens whose KV is in the cache
    generated: int = 0
    blocks: int = 0
    first_token_s: float | None = None
    preemptions: int = 0
    decoding: bool = False  # its prompt (and, after a preemption, what it had generated) is in the cache

    @property
    def known(self) -> int:
        """Tokens a (re)computed prefill must cover: the prompt plus what was generated before a preemption."""
        return self.input_tokens + self.generated

    @property
    def prefilling(self) -> bool:
        return not self.decoding

    def next_tokens(self) -> int:
        return self.known - self.computed if self.prefilling else 1


@dataclass
class Step:
    """What the scheduler decided for one segment: ``steps`` steps of ``work`` (sequence, tokens per step)."""

    work: list[tuple[Seq, int]]
    steps: int = 1

    @property
    def decode_only(self) -> bool:
        return all(not s.prefilling for s, _ in self.work)

    def batch(self) -> Batch:
        prefills = tuple((n, s.computed) for s, n in self.work if s.prefilling)
        decodes = tuple(s.computed + 1 for s, n in self.work if not s.prefilling)
        return Batch(prefills, decodes)


def blocks_for(tokens: int, block_tokens: int) -> int:
    return -(-tokens // block_tokens)


@dataclass
class EngineScheduler:
    config: SchedulerConfig = field(default_factory=SchedulerConfig)
    total_blocks: int = 0
    waiting: deque[Seq] = field(default_factory=deque)
    running: list[Seq] = field(default_factory=list)
    preemptions: int = 0
    used_blocks: int = 0  # blocks the running sequences hold (kept as they change: the batch can be large)

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def _ensure(self, need: int, more_kv: Callable[[int], bool]) -> bool:
        """Whether ``need`` blocks are free, after asking the owner for more while it can give some."""
        while need > self.free_blocks:
            if not more_kv(need - self.free_blocks):
                return False
        return True

    def _preempt_last(self) -> Seq:
        victim = self.running.pop()
        self.used_blocks -= victim.blocks
        victim.blocks = 0
        victim.computed = 0
        victim.decoding = False
        victim.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def schedule(self, more_kv: Callable[[int], bool] = lambda blocks: False) -> Step | None:
        """The next segment, or None when there is nothing to run. ``more_kv(blocks)`` asks the owner for more
        KV blocks before a sequence is preempted or left waiting (KV lent to prewarmed copies taken back)."""
        bt = self.config.block_tokens
        while self.used_blocks > self.total_blocks and self.running:  # the cache shrank under us
            if not more_kv(self.used_blocks - self.total_blocks):
                self._preempt_last()
        budget = self.config.max_num_batched_tokens
        work: list[tuple[Seq, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            s = self.running[i]
            n = min(s.next_tokens(), budget)
            need = blocks_for(s.computed + n, bt) - s.blocks
            victim = None
            while not self._ensure(need, more_kv):
                victim = self._preempt_last()
                preempted = True
                if victim is s:
                    break
            if victim is s:
                break
            s.blocks += need
            self.used_blocks += need
            work.append((s, n))
            budget -= n
            i += 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            s = self.waiting[0]
            n = min(s.next_tokens(), budget)
            need = blocks_for(s.computed + n, bt) - s.blocks
            if not self._ensure(need, more_kv):
                break
            self.waiting.popleft()
            self.running.append(s)
            s.blocks += need
            self.used_blocks += need
            work.append((s, n))
            budget -= n
        if not work:
            return None
        step = Step(work)
        if step.decode_only and (not self.waiting or len(self.running) >= self.config.max_num_seqs
                                 or self.free_blocks <= 0 or budget <= 0):
            step.steps = self._decode_run_length(work)
        return step

    def _decode_run_length(self, work: list[tuple[Seq, int]]) -> int:
        """Steps this decode batch can run unchanged: until a sequence finishes or a block is missing
        (the first step's blocks are already allocated)."""
        bt = self.config.block_tokens
        limit = min(s.output_tokens - s.generated for s, _ in work)
        free = self.free_blocks

        def extra_blocks(k: int) -> int:  # blocks needed beyond those held for the first step, after k steps
            return sum(blocks_for(s.computed + k, bt) - s.blocks for s, _ in work)

        lo, hi = 1, max(limit, 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if extra_blocks(mid) <= free:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def apply(self, step: Step, steps: int, end_s: float) -> list[Seq]:
        """``steps`` steps of ``step`` ran, the last ending at ``end_s``: progress, first tokens, and the
        sequences that finished (removed, their blocks freed)."""
        bt = self.config.block_tokens
        done = []
        for s, n in step.work:  # (preemption happens only when a segment is scheduled, never within one)
            if s.prefilling:
                s.computed += n
                if s.computed >= s.known:
                    s.decoding = True
                    s.generated += 1
                    if s.first_token_s is None:
                        s.first_token_s = end_s
            else:
                s.computed += steps
                s.generated += steps
                grown = max(blocks_for(s.computed, bt) - s.blocks, 0)
                s.blocks += grown
                self.used_blocks += grown
            if s.generated >= s.output_tokens:
                done.append(s)
        if done:
            finished = set(map(id, done))
            self.running = [s for s in self.running if id(s) not in finished]
        for s in done:
            self.used_blocks -= s.blocks
            s.blocks = 0
        return done
