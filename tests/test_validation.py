"""Validation during training (perception_r1/validation.py), without Ray: the held-out split is never
trained on; the session validates before the first step, every k steps and at the last step, greedily,
at the version it decoded with; `val/*` reaches the sinks; errors are counted, a hung validation ends at
its deadline and a stop ends it promptly (fakes of tests/driver_fakes.py)."""

import asyncio
import time

import pytest
from driver_fakes import FakeGenerator, run_session, trained_ids

from core.config import (
    HeldOutFractionConfig,
    SyntheticDataConfig,
    ValidationConfig,
    ValidationFileConfig,
)
from core.config_files import parse_config
from core.records import Prompt
from perception_r1.tracking import ConsoleSink
from perception_r1.validation import content_key, split

EVERY = {"every_steps": 2, "source": {"type": "fraction", "fraction": 0.1, "seed": 3}}


def prompts(n: int) -> list[Prompt]:
    return [Prompt(id=f"p{i}", index=i, problem=f"<image>x{i}", answer="1", image=b"") for i in range(n)]


# ------------------------------------------------------------------------------------------ the split
def test_a_fraction_is_held_out_by_seed_and_never_trained():
    data = prompts(40)
    data.append(Prompt(id="copy-of-p7", index=40, problem="<image>x7", answer="1", image=b""))  # same problem
    cfg = ValidationConfig(source=HeldOutFractionConfig(fraction=0.1, seed=3))
    train, held = split(data, cfg)
    assert len(held) == 4 and split(data, cfg) == (train, held)  # the same seed holds out the same prompts
    assert {p.id for p in held} != {p.id for p in split(data, ValidationConfig(source=HeldOutFractionConfig(
        fraction=0.1, seed=4)))[1]}
    assert not {content_key(p) for p in train} & {content_key(p) for p in held}
    assert len(train) + len(held) == len(data) - ("p7" in {p.id for p in held})  # its copy went with it
    assert split(data, ValidationConfig(every_steps=0)) == (data, [])  # off: everything trains


def test_a_validation_file_is_taken_out_of_the_training_prompts(tmp_path):
    from dataprep.synthetic import make_problems
    from dataprep.writer import write_dataset

    data = make_problems(SyntheticDataConfig(num_problems=6, image_size=64))
    path = write_dataset(data[:2], output_dir=tmp_path, fmt="parquet")
    train, held = split(data, ValidationConfig(source=ValidationFileConfig(path=str(path))))
    assert [p.id for p in held] == [p.id for p in data[:2]]
    assert [p.id for p in train] == [p.id for p in data[2:]]


def test_bad_validation_sources_name_the_field_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"validation.source.path .*missing.parquet does not exist; point it"):
        split(prompts(4), ValidationConfig(source=ValidationFileConfig(path=str(tmp_path / "missing.parquet"))))
    with pytest.raises(ValueError, match=r"validation.source.fraction=0.9 holds out all 2 prompts .* lower it"):
        split(prompts(2), ValidationConfig(source=HeldOutFractionConfig(fraction=0.9)))
    with pytest.raises(ValueError, match=r"validation.every_steps \(3\) is not a multiple of sync.interval_steps \(2\)"):
        parse_config({"buffer": {"max_staleness": 1}, "sync": {"interval_steps": 2}, "validation": {"every_steps": 3}})


# --------------------------------------------------------------------------------------- the session
def test_validation_runs_at_step_0_every_k_and_the_last_step_on_held_out_prompts(tmp_path):
    gens = []

    def generators(v):
        gens.extend([FakeGenerator(0, v), FakeGenerator(1, v)])
        return gens

    session, ledger, stream, sink = run_session(tmp_path, generators=generators, num_steps=5, max_staleness=0,
                                                validation=EVERY)
    held = {f"p{i}" for i in range(40)} - {p.id for p in stream.prompts}
    assert len(held) == 4 and not held & set(trained_ids(ledger)) and len(ledger) == 5
    # each validation decoded every held-out prompt once, greedily, with the weights of the step it is logged at
    calls = [c for g in gens for c in g.validation_calls]
    assert sorted(pid for ids, _ in calls for pid in ids) == sorted(list(held) * 4)
    assert sorted({version for _, version in calls}) == [0, 2, 4, 5]
    rows = [(step, m) for step, m in sink.rows if "val/accuracy" in m]
    assert [step for step, _ in rows] == [0, 2, 4, 5] == [step for step, _ in session.validations]
    for step, m in rows:
        assert m["val/policy_version"] == step and m["val/num_prompts"] == 4 and m["val/errors"] == 0
        assert m["val/accuracy"] == 1.0 and m["val/reward"] == 1.0  # the fake scores rollout 0 of a group 1
        assert {"val/format", "val/visual", "val/repetition", "val/seconds"} <= set(m)
    assert all(not any(k.startswith("val/") for k in m) for _, m in sink.rows if "learner/loss" in m)


class FailsValidation(FakeGenerator):
    """Fails every validation call of prompts in `bad`; training calls are served."""

    def __init__(self, *args, bad=(), **kw):
        super().__init__(*args, **kw)
        self.bad = set(bad)

    async def generate(self, prompts, *, sampling=None):
        if sampling is not None and {p.id for p in prompts} & self.bad:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return await super().generate(prompts, sampling=sampling)


def test_validation_errors_are_counted_and_training_goes_on(tmp_path):
    held = split(prompts(40), ValidationConfig(**EVERY))[1]
    session, ledger, _, sink = run_session(
        tmp_path, generators=lambda v: [FailsValidation(0, v, bad={held[0].id})], num_steps=4, validation=EVERY)
    assert not session.fatal and len(ledger) == 4
    rows = [m for _, m in sink.rows if "val/num_prompts" in m]
    assert len(rows) == 3 and all(m["val/num_prompts"] == 3 and m["val/errors"] == 1 for m in rows)
    assert session.counters()["val_generate_errors/RuntimeError"] == 3


class HangsValidation(FakeGenerator):
    async def generate(self, prompts, *, sampling=None):
        if sampling is not None:
            await asyncio.sleep(3600)
        return await super().generate(prompts, sampling=sampling)


def test_a_hung_validation_ends_at_its_deadline_and_training_goes_on(tmp_path):
    run = {"stall_timeout_s": 1.0, "startup_timeout_s": 5.0}
    session, ledger, _, sink = run_session(tmp_path, generators=lambda v: [HangsValidation(0, v)], num_steps=2,
                                           validation={**EVERY, "every_steps": 10}, run=run, timeout_s=20)
    assert not session.fatal and len(ledger) == 2  # the stall watchdog did not count the validation's time
    assert session.counters()["val_timeouts"] == 2 and not any("val/accuracy" in m for _, m in sink.rows)


def test_a_stop_during_validation_ends_it_promptly(tmp_path):
    async def stop_while_validating(session):
        while not session._validation_running():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        session.request_stop()

    started = time.monotonic()
    session, ledger, _, _ = run_session(tmp_path, generators=lambda v: [HangsValidation(0, v)],
                                        validation=EVERY, during=stop_while_validating, timeout_s=20)
    assert session.stop_requested and not session.fatal and ledger == []  # held: nothing trained
    assert session.validating[0].cancelled() and time.monotonic() - started < 5
    assert session.validating[1] == 0 and not session.validations


def test_the_learner_waits_for_the_validation_even_with_groups_ready(tmp_path):
    """max_staleness 1: the buffer already holds the next step's groups when a validation starts; the buffer
    holds the learner at that version, so every validation decodes with exactly the weights of its step."""
    gens = []
    session, ledger, _, _ = run_session(tmp_path, generators=lambda v: gens.append(FakeGenerator(0, v)) or gens,
                                        num_steps=6, max_staleness=1, validation=EVERY)
    assert [step for step, _ in session.validations] == [0, 2, 4, 6] and len(ledger) == 6
    assert [version for _, version in gens[0].validation_calls] == [0] * 4 + [2] * 4 + [4] * 4 + [6] * 4


def test_the_buffer_holds_takes_at_validated_versions_only():
    from driver_fakes import FakeScorer, _group

    from replay.buffer import ReplayBuffer, entry_meta

    buffer = ReplayBuffer(max_staleness=1, groups_per_step=1, max_groups=8, max_bytes=1 << 30, validate_every=2)

    async def put(version: int) -> None:
        assert await asyncio.wait_for(buffer.reserve(1), 1)
        scored = await FakeScorer().score(_group(prompts(1)[0], version, 0))
        await buffer.put([scored], entry_meta(scored))

    async def took() -> bool:
        try:
            return await asyncio.wait_for(buffer.take(1), 0.05) is not None
        except asyncio.TimeoutError:
            return False

    async def scenario():
        await buffer.learner_started(0)
        await put(0)
        assert not await took()  # held before the first step
        await buffer.validated(0)
        assert await took()
        await buffer.publish_version(1, 1)
        await put(1)
        assert await took()  # 1 is not a validated version: no hold
        await buffer.publish_version(2, 2)
        await put(2)
        await buffer.validated(0)  # the end of an older version's validation changes nothing
        assert not await took()
        await buffer.learner_started(2)  # a restart (from a checkpoint) ends any hold
        assert await took()

    asyncio.run(asyncio.wait_for(scenario(), 10))


# ------------------------------------------------------------------------------------------ the sinks
def test_the_console_shows_each_validation_whatever_the_step_interval():
    lines = []
    sink = ConsoleSink(every=10, write=lines.append)
    sink.log_metrics(3, {"reward/total": 0.5})
    sink.log_metrics(5, {"val/accuracy": 0.25, "val/reward": 0.75, "val/num_prompts": 4.0})
    assert lines == ["validation at step 5: accuracy=0.25 reward=0.75 num_prompts=4"]

