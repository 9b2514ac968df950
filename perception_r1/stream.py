"""The training prompt stream and its ledger: which stream positions (seqs) were dispatched, trained,
dropped or evicted, so a checkpoint can say exactly where to resume.

The stream is the dataset repeated epoch after epoch, each epoch shuffled with `shuffle_seed + epoch`
(dataset order when None); seq = epoch * len(dataset) + position. Resume replays the unresolved seqs
first, in seq order, then continues, so no prompt is skipped or trained twice across a restart.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from core.records import Prompt


@dataclass
class StreamState:
    """What a checkpoint stores of the stream (msgpack-friendly)."""

    next_seq: int = 0
    """The first seq never dispatched."""
    pending: list[int] = field(default_factory=list)
    """Seqs dispatched but neither trained, dropped nor evicted: replayed first on resume."""


class PromptStream:
    def __init__(self, prompts: list[Prompt], *, shuffle_seed: int | None, state: StreamState | None = None) -> None:
        if not prompts:
            raise ValueError("the dataset has no prompts; check data.dataset")
        self.prompts, self.shuffle_seed = prompts, shuffle_seed
        state = state or StreamState()
        self.next_seq = state.next_seq
        self.replay = sorted(state.pending)
        self.outstanding: set[int] = set()
        self._orders: dict[int, list[int]] = {}

    def next(self) -> tuple[int, Prompt]:
        """The next (seq, prompt): replayed seqs first, then new ones."""
        if self.replay:
            seq = heapq.heappop(self.replay)
        else:
            seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.outstanding.add(seq)
        return seq, self.prompt_at(seq)

    def prompt_at(self, seq: int) -> Prompt:
        epoch, pos = divmod(seq, len(self.prompts))
        return self.prompts[self._order(epoch)[pos]]

    def claim(self, seq: int) -> None:
        """A replayed seq whose group came back from a checkpoint's buffer: outstanding, not dispatched."""
        self.replay.remove(seq)
        heapq.heapify(self.replay)
        self.outstanding.add(seq)

    def resolve(self, seqs) -> None:
        """These seqs are done for good (trained, dropped or evicted)."""
        self.outstanding.difference_update(seqs)

    def requeue(self, seqs) -> None:
        """These seqs were lost in flight (an actor died): dispatch them again, oldest first."""
        for seq in seqs:
            self.outstanding.discard(seq)
            heapq.heappush(self.replay, seq)

    def state(self, *, unresolved: set[int] | None = None) -> StreamState:
        """The state to checkpoint; `unresolved` overrides the live outstanding set (a past step's view)."""
        pending = self.outstanding if unresolved is None else unresolved
        return StreamState(next_seq=self.next_seq, pending=sorted(set(pending) | set(self.replay)))

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.prompts)))
            if self.shuffle_seed is not None:
                random.Random(self.shuffle_seed + epoch).shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time in memory
        return self._orders[epoch]
