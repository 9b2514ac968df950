"""A generation actor dying during a weight sync costs a retry, not a skipped version: at max_staleness 0 a
skipped sync would leave no group startable for the next step (the run would wait on itself)."""

from dataclasses import dataclass, field

import torch
from gloo_ranks import run_gloo_ranks

from learner.sync import ReceiverLost
from learner.worker import SYNC_ATTEMPTS, _sync


@dataclass
class FakeLearner:
    model: torch.nn.Module = field(default_factory=lambda: torch.nn.Linear(2, 2))
    optimizer_done: None = None
    device: torch.device = torch.device("cpu")


class FlakySync:
    """Raises ReceiverLost for the first `failures` broadcasts."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, []

    def broadcast(self, model, *, version, after=None):
        self.calls.append(version)
        if len(self.calls) <= self.failures:
            raise ReceiverLost(f"generation actor(s) [1] died during the weight sync of version {version}")
        return 0.01, 123


def test_a_receiver_lost_once_is_retried_at_once_and_the_sync_lands(capsys):
    sync = FlakySync(failures=1)
    seconds, nbytes = _sync(sync, FakeLearner(), version=4)
    assert sync.calls == [4, 4] and nbytes == 123 and seconds is not None
    assert "retrying now" in capsys.readouterr().out


def test_a_receiver_lost_at_every_try_skips_the_sync(capsys):
    sync = FlakySync(failures=5)
    assert _sync(sync, FakeLearner(), version=4) == (None, 0)
    assert sync.calls == [4] * SYNC_ATTEMPTS == [4, 4, 4]
    assert "this sync is skipped" in capsys.readouterr().out


def test_a_sync_that_lands_is_sent_once():
    sync = FlakySync(failures=0)
    seconds, nbytes = _sync(sync, FakeLearner(), version=2)
    assert sync.calls == [2] and nbytes == 123 and 0 <= seconds < 5


def _retrying_rank(rank: int) -> tuple[list[int], bool]:
    sync = FlakySync(failures=1 if rank == 0 else 0)  # rank 0 alone sees the receiver die
    seconds, _ = _sync(sync, FakeLearner(), version=3)
    return sync.calls, seconds is not None


def test_every_rank_retries_when_rank_0_lost_a_receiver():
    """The other ranks take part in the retry's gathers: they learn of rank 0's failure."""
    assert run_gloo_ranks(_retrying_rank, 2) == {0: ([3, 3], True), 1: ([3, 3], True)}
