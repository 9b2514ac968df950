"""The replay buffer: scored groups (as object refs) between the judge and the learner, bounded,
staleness-gated, and the place where producers wait.

Entry lifecycle (every group ends in exactly one of TAKEN or EVICTED, or is still BUFFERED):

    reserve() ─> RESERVED ──put()──> BUFFERED ──take()──> TAKEN (trained once)
                    │                   └─ learner moved on ─> EVICTED (stale, counted)
                    └─ release() (generation failed, group dropped) ─> slot freed, counted

Rules it enforces:
- Staleness: a group leaves through take() only while
  `learner_version - group.policy_version <= max_staleness`; one that can no longer satisfy it is
  evicted and counted, never trained.
- Reservation gate (who unblocks whom): a producer may start a group only while
  `taken + buffered + reserved <= (synced_version + max_staleness + 1) * groups_per_step`
  (versions counted from the run's start version),
  so every group it starts will still be fresh enough when its step comes; `max_staleness = 0`
  makes the system exactly synchronous. publish_version() from the learner unblocks producers.
- Bounds: buffered + reserved groups <= max_groups and buffered bytes <= max_bytes; reserve()
  waits while full (back-pressure); take() unblocks it.
- FIFO: take() releases the oldest admissible groups first.
- Learner restarts: learner_started() at a start after the first rewinds the versions to the restored
  checkpoint's and returns the dead learner's last batch as lost (the driver requeues what it never
  saw trained), so no group is trained twice or dropped silently.
- Validation hold (`validate_every` > 0): at the learner's first start and at each published version that
  is a multiple of it, take() waits until the driver says `validated(version)`; the learner cannot move on
  (and broadcast newer weights) while the driver validates the weights of that version. Producers go on.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from core.records import BufferStats, ScoredGroup


@dataclass(frozen=True, slots=True)
class EntryMeta:
    """What the buffer knows of a group without fetching it."""

    prompt_id: str
    seq: int
    """The group's position in the training stream (evictions are reported by it)."""
    policy_version: int
    nbytes: int


@dataclass(slots=True)
class _Entry:
    ref: Any
    meta: EntryMeta


class BufferCore:
    """The buffer's bookkeeping, free of Ray and asyncio (property-tested on its own)."""

    def __init__(self, *, max_staleness: int, groups_per_step: int, max_groups: int, max_bytes: int,
                 initial_version: int = 0) -> None:
        self.max_staleness, self.groups_per_step = max_staleness, groups_per_step
        self.max_groups, self.max_bytes = max_groups, max_bytes
        self.entries: deque[_Entry] = deque()
        self.bytes = self.reserved = 0
        self.num_put = self.num_taken = self.num_evicted = self.num_released = 0
        self.initial_version = self.learner_version = self.synced_version = initial_version
        self.taken_base = 0
        """num_taken when the window's version base was last set (start, or a learner restart)."""
        self.published = initial_version == 0
        """A resumed run's actors hold stale weights until the learner's first broadcast: no reservations before."""
        self.taken_staleness: Counter[int] = Counter()
        self.evicted_seqs: list[int] = []
        self.last_taken: list[int] = []
        """Seqs of the newest take(): the batch a learner that dies now had taken but not reported."""
        self.lost_seqs: list[int] = []
        """Seqs a dead learner had taken (the driver requeues those it never saw trained)."""
        self.learner_starts = 0

    def can_reserve(self, n: int) -> bool:
        if not self.published:
            return False
        window = (self.synced_version - self.initial_version + self.max_staleness + 1) * self.groups_per_step
        fresh_enough = self.num_taken - self.taken_base + len(self.entries) + self.reserved + n <= window
        has_room = len(self.entries) + self.reserved + n <= self.max_groups and self.bytes < self.max_bytes
        return fresh_enough and has_room

    def reserve(self, n: int) -> None:
        assert self.can_reserve(n)
        self.reserved += n

    def release(self, n: int) -> None:
        assert 0 < n <= self.reserved, (n, self.reserved)
        self.reserved -= n
        self.num_released += n

    def put(self, ref: Any, meta: EntryMeta) -> bool:
        """Admit a reserved group; False (evicted, counted) if it is already too stale to train."""
        assert self.reserved > 0, "put() without reserve()"
        self.reserved -= 1
        self.num_put += 1
        if self.learner_version - meta.policy_version > self.max_staleness:
            self.num_evicted += 1
            self.evicted_seqs.append(meta.seq)
            return False
        self.entries.append(_Entry(ref, meta))
        self.bytes += meta.nbytes
        return True

    def publish_version(self, *, learner_version: int, synced_version: int) -> None:
        if learner_version < self.learner_version:  # the learner restarted from an older checkpoint
            self._rewind(learner_version)
        assert learner_version >= self.learner_version and synced_version >= self.synced_version
        self.learner_version, self.synced_version = learner_version, synced_version
        self.published = True
        self._evict_stale()

    def learner_started(self, version: int) -> None:
        """A learner (re)started at `version` (its checkpoint's). A restart rewinds to it, even when no
        update was lost, and hands the batch the dead learner had taken to `lost_seqs`."""
        if self.learner_starts:
            self._rewind(version)
            self.lost_seqs.extend(self.last_taken)
            self.last_taken = []
        self.learner_starts += 1
        self.publish_version(learner_version=version, synced_version=version)

    def _rewind(self, version: int) -> None:
        """Versions restart at `version`: groups made by the lost, newer weights are evicted (counted)."""
        self.initial_version = self.learner_version = self.synced_version = version
        self.taken_base = self.num_taken
        future = [e for e in self.entries if e.meta.policy_version > version]
        self.entries = deque(e for e in self.entries if e.meta.policy_version <= version)
        self.evicted_seqs.extend(e.meta.seq for e in future)
        self.num_evicted += len(future)
        self.bytes -= sum(e.meta.nbytes for e in future)

    def can_take(self, k: int) -> bool:
        self._evict_stale()
        return len(self.entries) >= k

    def take(self, k: int) -> list[tuple[Any, EntryMeta, int]]:
        """The k oldest groups with their staleness; each leaves the buffer for good."""
        assert self.can_take(k)
        out = []
        for _ in range(k):
            entry = self.entries.popleft()
            self.bytes -= entry.meta.nbytes
            staleness = self.learner_version - entry.meta.policy_version
            assert 0 <= staleness <= self.max_staleness, staleness
            self.taken_staleness[staleness] += 1
            out.append((entry.ref, entry.meta, staleness))
        self.num_taken += k
        self.last_taken = [meta.seq for _, meta, _ in out]
        return out

    def _evict_stale(self) -> None:
        stale = [e for e in self.entries if self.learner_version - e.meta.policy_version > self.max_staleness]
        if not stale:
            return
        self.entries = deque(e for e in self.entries if self.learner_version - e.meta.policy_version <= self.max_staleness)
        self.evicted_seqs.extend(e.meta.seq for e in stale)
        self.num_evicted += len(stale)
        self.bytes -= sum(e.meta.nbytes for e in stale)

    def stats(self) -> BufferStats:
        return BufferStats(
            depth=len(self.entries), bytes=self.bytes, reserved=self.reserved, num_put=self.num_put,
            num_taken=self.num_taken, num_evicted=self.num_evicted, num_released=self.num_released,
            learner_version=self.learner_version, synced_version=self.synced_version,
            taken_staleness=dict(self.taken_staleness))


class ReplayBuffer:
    """The buffer as an asyncio Ray actor: the driver wraps it with `ray.remote(num_cpus=0)`.

    Groups arrive as object refs inside a list (so Ray does not resolve them); the learner receives
    the refs from take() and fetches the groups itself, so group data never passes through here.
    """

    def __init__(self, *, max_staleness: int, groups_per_step: int, max_groups: int, max_bytes: int,
                 initial_version: int = 0, validate_every: int = 0) -> None:
        self.core = BufferCore(max_staleness=max_staleness, groups_per_step=groups_per_step,
                               max_groups=max_groups, max_bytes=max_bytes, initial_version=initial_version)
        self.changed = asyncio.Condition()
        self.closed = False
        self.validate_every = validate_every
        self.held: int | None = None
        """The version whose validation take() waits for (None: not holding)."""

    async def reserve(self, n: int = 1) -> bool:
        """Wait for room for n groups; False once the buffer is closed."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.closed or self.core.can_reserve(n))
            if self.closed:
                return False
            self.core.reserve(n)
            return True

    async def release(self, n: int = 1) -> None:
        async with self.changed:
            self.core.release(n)
            self.changed.notify_all()

    async def put(self, refs: list, meta: EntryMeta) -> bool:
        (ref,) = refs
        async with self.changed:
            admitted = self.core.put(ref, meta)
            self.changed.notify_all()
            return admitted

    async def take(self, k: int) -> list[tuple[list, EntryMeta, int]] | None:
        """Wait for k admissible groups: [([ref], meta, staleness)]; None once closed."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.closed or (self.held is None and self.core.can_take(k)))
            if self.closed:
                return None
            taken = self.core.take(k)
            self.changed.notify_all()
            return [([ref], meta, staleness) for ref, meta, staleness in taken]

    async def publish_version(self, learner_version: int, synced_version: int) -> None:
        async with self.changed:
            self.core.publish_version(learner_version=learner_version, synced_version=synced_version)
            if self.validate_every and learner_version % self.validate_every == 0:
                self.held = learner_version
            self.changed.notify_all()

    async def learner_started(self, version: int) -> None:
        """A (re)start; the first holds for the validation before the first step, a restart ends any hold."""
        async with self.changed:
            first = not self.core.learner_starts
            self.core.learner_started(version)
            self.held = version if first and self.validate_every else None
            self.changed.notify_all()

    async def validated(self, version: int) -> None:
        """The driver validated `version` (or gave up on it): take() may go on."""
        async with self.changed:
            if self.held == version:
                self.held = None
            self.changed.notify_all()

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    def stats(self) -> BufferStats:
        return self.core.stats()

    def pop_lost_seqs(self) -> list[int]:
        """Seqs a dead learner had taken, since the last call (the driver requeues the untrained ones)."""
        seqs, self.core.lost_seqs = self.core.lost_seqs, []
        return seqs

    def pop_evicted_seqs(self) -> list[int]:
        """Seqs evicted since the last call (the driver resolves them in its ledger)."""
        seqs, self.core.evicted_seqs = self.core.evicted_seqs, []
        return seqs

    def buffered_refs(self) -> list[tuple[list, EntryMeta]]:
        """Everything still buffered (for a checkpoint's snapshot), oldest first."""
        return [([e.ref], e.meta) for e in self.core.entries]


def entry_meta(scored: ScoredGroup) -> EntryMeta:
    """Metadata of a ScoredGroup, with its size estimated from its arrays, image and texts."""
    group = scored.group
    nbytes = len(group.prompt.image) + group.prompt_token_ids.nbytes
    nbytes += sum(r.token_ids.nbytes + r.logprobs.nbytes + len(r.text) for r in group.rollouts)
    return EntryMeta(prompt_id=group.prompt.id, seq=group.seq, policy_version=group.policy_version, nbytes=nbytes)
