"""Background checkpoints (learner/checkpoint_writer.py, learner/worker.py): the step loop goes on while a
write is held, the written checkpoint is the state at its step, at most one write is in flight, and a failed
or stalled write is an error naming the folder and the cause."""

import copy
import errno
import os
import threading
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from core.config import Config
from learner.checkpoint_writer import CheckpointWriter
from learner.schedule import warmup_scheduler
from learner.sharded_state import LEARNER_META, load_learner


class GatedWriter(FileSystemWriter):
    """DCP's file-system writer, holding every write until the test opens the gate; optionally failing."""

    def __init__(self, path: str, *, gate: threading.Event, fail: OSError | None = None) -> None:
        super().__init__(path)
        self.gate, self.fail = gate, fail

    def write_data(self, plan, planner):
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        if self.fail is not None:
            raise self.fail
        return super().write_data(plan, planner)


def gated(gate: threading.Event, fail: OSError | None = None):
    return lambda path: GatedWriter(path, gate=gate, fail=fail)


def policy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, warmup_scheduler(optimizer, warmup_steps=3)


def train_step(model, optimizer, scheduler) -> None:
    optimizer.zero_grad()
    model(torch.randn(4, 8)).square().mean().backward()
    optimizer.step()
    scheduler.step()


def snapshot(model, optimizer, scheduler) -> dict:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()), "scheduler": copy.deepcopy(scheduler.state_dict())}


def assert_state_equals(state: dict, model, optimizer, scheduler) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
    got, want = optimizer.state_dict(), state["optimizer"]
    for key, moments in want["state"].items():
        for name, value in moments.items():
            assert torch.equal(got["state"][key][name], value), (key, name)
    assert got["param_groups"][0]["lr"] == want["param_groups"][0]["lr"]
    assert scheduler.state_dict() == state["scheduler"]


def test_the_step_loop_goes_on_while_a_checkpoint_is_written_and_the_checkpoint_is_its_steps_state(tmp_path):
    model, optimizer, scheduler = policy()
    for _ in range(2):
        train_step(model, optimizer, scheduler)
    at_step = snapshot(model, optimizer, scheduler)
    gate = threading.Event()
    writer = CheckpointWriter(timeout_s=60, storage_writer=gated(gate))
    path = tmp_path / "step_000002.tmp"
    writer.start(path, model=model, optimizer=optimizer, scheduler=scheduler, version=2)  # returns, write held
    for _ in range(3):  # the loop goes on, changing parameters and optimizer state under the held write
        train_step(model, optimizer, scheduler)
    assert writer.finished(wait=False) is None  # still in flight
    assert not (path / LEARNER_META).exists()  # and not announced as whole: learner.json comes last
    gate.set()
    written = writer.finished(wait=True)
    assert written.version == 2 and written.path == path and written.seconds > 0
    assert written.nbytes == sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) > 0
    assert writer.in_flight is None and writer.last_version == 2

    fresh = policy()
    train_step(*fresh)  # optimizer state to load into
    assert load_learner(path, model=fresh[0], optimizer=fresh[1], scheduler=fresh[2]) == 2
    assert_state_equals(at_step, *fresh)
    assert not torch.equal(fresh[0][0].weight, model[0].weight)  # the live model moved on


def test_at_most_one_write_in_flight_the_next_checkpoint_waits_for_it(tmp_path):
    from learner.worker import _periodic_checkpoint

    model, optimizer, scheduler = policy()
    learner = SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler)
    cfg = Config.model_validate({"checkpoint": {"every_steps": 2}})
    wiring = SimpleNamespace(checkpoint_root=str(tmp_path))
    gate = threading.Event()
    writer = CheckpointWriter(timeout_s=60, storage_writer=gated(gate))
    first = _periodic_checkpoint(cfg, wiring, learner, writer, version=2)
    assert first.started == str(tmp_path / "step_000002.tmp") and first.earlier is None and first.now is None
    train_step(model, optimizer, scheduler)
    assert _periodic_checkpoint(cfg, wiring, learner, writer, version=3).started == ""  # not due; 2 still held
    assert writer.in_flight.version == 2
    threading.Timer(0.3, gate.set).start()
    second = _periodic_checkpoint(cfg, wiring, learner, writer, version=4)  # due: waits for step 2's write
    assert second.earlier.version == 2 and second.started.endswith("step_000004.tmp")
    assert second.metrics["checkpoint/wait_seconds"] > 0
    assert second.metrics["checkpoint/blocked_seconds"] >= second.metrics["checkpoint/wait_seconds"]
    assert second.metrics["checkpoint/gib"] > 0 and second.metrics["checkpoint/seconds"] > 0
    assert writer.finished(wait=True).version == 4
    assert (tmp_path / "step_000002.tmp" / LEARNER_META).is_file()


def test_with_background_off_the_step_waits_and_reports_the_write_itself(tmp_path):
    from learner.worker import _periodic_checkpoint

    model, optimizer, scheduler = policy()
    learner = SimpleNamespace(model=model, optimizer=optimizer, scheduler=scheduler)
    cfg = Config.model_validate({"checkpoint": {"every_steps": 1, "background": False}})
    done = _periodic_checkpoint(cfg, SimpleNamespace(checkpoint_root=str(tmp_path)), learner,
                                CheckpointWriter(timeout_s=60), version=1)
    assert done.now.version == 1 and (tmp_path / "step_000001.tmp" / LEARNER_META).is_file()


def test_a_failed_background_write_is_an_error_naming_the_cause(tmp_path):
    model, optimizer, scheduler = policy()
    gate = threading.Event()
    gate.set()
    writer = CheckpointWriter(timeout_s=60, storage_writer=gated(gate, fail=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    path = tmp_path / "step_000001.tmp"
    writer.start(path, model=model, optimizer=optimizer, scheduler=scheduler, version=1)  # fails in the thread
    with pytest.raises(OSError, match=r"cannot write checkpoint .*step_000001.tmp: no space left on device \(ENOSPC\)"):
        writer.finished(wait=True)
    assert not (path / LEARNER_META).exists() and writer.in_flight is None


def test_a_stalled_write_fails_after_the_timeout_naming_the_field(tmp_path):
    model, optimizer, scheduler = policy()
    gate = threading.Event()
    writer = CheckpointWriter(timeout_s=0.2, storage_writer=gated(gate))
    writer.start(tmp_path / "step_000001.tmp", model=model, optimizer=optimizer, scheduler=scheduler, version=1)
    try:
        with pytest.raises(TimeoutError, match=r"step_000001.tmp was not written within checkpoint.write_timeout_s=0.2s"):
            writer.finished(wait=True)
    finally:
        gate.set()  # let the writer thread end


def test_the_final_checkpoint_is_written_unless_this_version_has_one():
    from learner.worker import _final_checkpoint_needed

    cfg = Config.model_validate({"run": {"num_steps": 10}, "checkpoint": {"every_steps": 5}})
    need = lambda **kw: _final_checkpoint_needed(cfg, **({"last": None, "lost": False, "announced": False} | kw))  # noqa: E731
    assert not need(version=10, last=10)  # the last periodic snapshot is this version (waited for before)
    assert need(version=7, last=5)  # stopped between checkpoints
    assert not need(version=10)  # resumed at the end from step 10's complete checkpoint: nothing new
    assert need(version=10, lost=True)  # the undelivered reports need a .tmp of their own
    assert need(version=10, last=10, lost=True, announced=True)  # the driver may be renaming step 10's folder
    assert not need(version=10, last=10, lost=True, announced=False)  # its .tmp stays: the reports go beside it
    every0 = Config.model_validate({"run": {"num_steps": 10}, "checkpoint": {"every_steps": 0}})
    assert _final_checkpoint_needed(every0, version=10, last=None, lost=False, announced=False)
