"""Continuous batching: FCFS admission by free cache, chunked prefill under a token budget mixed
with decodes, and preemption by recompute when the pools run out. A sequence is admitted only when
its whole prompt fits (so a long prompt admitted on its first chunk cannot later evict the others,
or itself, half-way through: recompute thrash), and not in a step that had to preempt (as vLLM:
the freed room is for the running ones). With prefix caching a waiting
sequence resumes after its longest cached prefix, and prefill chunks end where a state snapshot
is saved. The scheduler owns each sequence's progress (advance, finish, preempt) and never
touches tensors."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .cache_manager import CacheManager
from .sequence import Sequence, SeqStatus


@dataclass
class ScheduledBatch:
    """The work of one engine step: how many new tokens each scheduled sequence computes."""

    work: list[tuple[Sequence, int]] = field(default_factory=list)
    loads: list[tuple[int, list[int]]] = field(default_factory=list)  # (slot, snapshot blocks) before the step
    saves: list[tuple[int, list[int]]] = field(default_factory=list)  # (slot, blocks) after the step

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)

    def __bool__(self) -> bool:
        return bool(self.work)


class Scheduler:
    def __init__(self, cache: CacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order (oldest first)
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work: running sequences first (oldest first), then waiting ones."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        preemptions = self.num_preemptions
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = self.cache.chunk(seq, min(seq.num_tokens - seq.num_computed, budget))
            if not self._make_room(seq, seq.num_computed + n, scheduled):
                continue
            self._schedule(batch, seq, n)
            scheduled.add(seq.seq_id)
            budget -= n
        while (self.waiting and budget > 0 and len(self.running) < self.max_num_seqs
               and self.num_preemptions == preemptions):
            seq = self.waiting[0]
            resumed = self.cache.resume(seq)
            if resumed is None:  # it does not fit, or its next block is being computed by a running
                break  # sequence (wait rather than compute it twice); FCFS: nobody overtakes it
            hit, load = resumed
            n = hit.chunk(min(seq.num_tokens - hit.num_tokens, budget))
            self.waiting.popleft()
            seq.num_computed = hit.num_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self._schedule(batch, seq, n)
            if load:
                batch.loads.append((seq.slot, load))
            budget -= n
        return batch

    def _schedule(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        self.cache.allocate(seq, seq.num_computed + n)
        batch.work.append((seq, n))
        save = self.cache.plan_snapshot(seq, seq.num_computed + n)
        if save:
            batch.saves.append((seq.slot, save))

    def advance(self, batch: ScheduledBatch) -> None:
        """Record that the batch's tokens are now in the cache."""
        for seq, n in batch.work:
            seq.num_computed += n
            self.cache.commit(seq)

    def _make_room(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        """Preempt the newest unscheduled running sequences until seq can hold n tokens.
        Returns False when seq itself had to be preempted."""
        while not self.cache.can_allocate(seq, n):
            victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
            victim = victims[-1] if victims else seq
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free seq's cache and queue it (first) for recomputation."""
        self.running.remove(seq)
        self.cache.free(seq, finished=False)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire seq (finished or aborted) and return its cache."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.cache.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
