"""The verifier pool: same scores as the in-process rule, a pathological answer costs its timeout and a
0 (counted) and the worker is replaced, a dead worker is replaced, and it runs off the main thread."""

import asyncio
import os
import signal
import threading
import time

import pytest

from judge.rules import accuracy_reward
from judge.verifier import VerifierPool

PATHOLOGICAL = r"\boxed{9^{9^{9^{9}}}}"  # sympy evaluates the tower: minutes in-process
CASES = [(r"\boxed{24}", "24"), (r"\boxed{2\sqrt{3}}", r"2\sqrt{3}"), (r"\boxed{45°}", "45"), ("no answer", "7"),
         (r"\boxed{A}", "A"), (r"\boxed{\frac{1}{2}}", "0.5")]


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def pool(loop):
    pool = VerifierPool(num_workers=2, timeout_s=1.0)
    loop.run_until_complete(pool.start())
    yield pool
    loop.run_until_complete(pool.close())


@pytest.mark.parametrize("mode", ["reference", "fixed"])
def test_pool_scores_equal_in_process_scores(loop, pool, mode):
    async def run():
        return await asyncio.gather(*[pool.accuracy(t, gt, mode=mode) for t, gt in CASES])

    assert loop.run_until_complete(run()) == [accuracy_reward(t, gt, mode=mode) for t, gt in CASES]


def test_pathological_answer_costs_its_timeout_and_a_zero(loop, pool):
    before = pool.counters.num_verify_timeouts

    async def run():
        started = time.perf_counter()
        bad = await pool.accuracy(PATHOLOGICAL, "2", mode="reference")
        elapsed = time.perf_counter() - started
        others = await asyncio.gather(*[pool.accuracy(r"\boxed{24}", "24", mode="reference") for _ in range(8)])
        return bad, elapsed, others

    bad, elapsed, others = loop.run_until_complete(run())
    assert bad == 0.0 and 1.0 <= elapsed < 2.0
    assert others == [1.0] * 8  # the other worker kept serving; the replacement comes up in the background
    assert pool.counters.num_verify_timeouts == before + 1


def test_dead_worker_is_replaced(loop, pool):
    before = pool.counters.num_verify_crashes

    async def run():
        await pool.accuracy(r"\boxed{1}", "1", mode="reference")
        worker = await pool._idle.get()  # take one idle worker, kill it, hand it back
        os.kill(worker.proc.pid, signal.SIGKILL)
        await worker.proc.wait()
        pool._idle.put_nowait(worker)
        return await asyncio.gather(*[pool.accuracy(r"\boxed{3}", "3", mode="reference") for _ in range(6)])

    scores = loop.run_until_complete(run())
    assert sorted(scores) == [0.0] + [1.0] * 5  # the request that met the dead worker scored 0
    assert pool.counters.num_verify_crashes == before + 1


def test_pool_runs_off_the_main_thread():
    """math-verify's signal timeouts raise outside the main thread; the pool's workers never use them."""
    result = {}

    def thread():
        async def run():
            pool = VerifierPool(num_workers=1, timeout_s=5.0)
            try:
                return await pool.accuracy(r"\boxed{2\sqrt{3}}", r"$2\sqrt{3}$", mode="reference")
            finally:
                await pool.close()

        result["score"] = asyncio.run(run())

    t = threading.Thread(target=thread)
    t.start()
    t.join(60)
    assert result == {"score": 1.0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_workers=0"):
        VerifierPool(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s=0"):
        VerifierPool(timeout_s=0)
