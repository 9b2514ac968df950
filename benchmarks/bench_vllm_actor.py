"""vLLM throughput inside a generation actor, fed by the driver's own dispatch, vs bare vLLM: same model,
prompts, per-request token limits and GPU. Output tokens/s each, and the latency of each group.

Bare: one AsyncLLM in this process with every request submitted at once (vLLM's scheduler alone keeps
the batch full). In-actor: the system's GenerationActor (Ray) driven by the driver's dispatch loop
(`perception_r1.orchestrator.Orchestrator`, the config's prompts_per_call and in-flight target) with
groups streamed back as they finish. With random weights nearly every sample runs to its limit, so each
prompt's limit is drawn from a long-tailed (log-normal) distribution capped at --max-tokens: a call's
groups end at very different times, as real completions do.

    python -m benchmarks.bench_vllm_actor DIR/vl7b --prompts 256 --n 8 --max-tokens 2048 --eager
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import math
import time

import numpy as np

from benchmarks.common import print_table, write_result


def prompts(count: int):
    from core.config import SyntheticDataConfig
    from dataprep.synthetic import make_problems

    return make_problems(SyntheticDataConfig(num_problems=count, seed=11))


def token_limits(ids: list[str], *, median: int, sigma: float, cap: int, seed: int = 0) -> dict[str, int]:
    """Each prompt's completion limit: log-normal around `median`, clipped to [16, cap]."""
    rng = np.random.default_rng(seed)
    draws = np.clip(rng.lognormal(math.log(median), sigma, size=len(ids)), 16, cap).astype(int)
    return dict(zip(ids, draws.tolist()))


def config(args):
    from core.config_files import parse_config

    return parse_config({
        "model": {"type": "pretrained", "path": args.model, "random_weights": True},
        "rollout": {"engine": {"type": "vllm", "load_format": "dummy", "gpu_memory_utilization": 0.85,
                               "max_model_len": 4096, "max_num_seqs": args.max_num_seqs,
                               "max_num_batched_tokens": 8192, "enforce_eager": args.eager},
                    "num_gpus_per_actor": 1, "samples_per_prompt": args.n, "max_new_tokens": args.max_tokens,
                    "prompts_per_call": args.per_call, "inflight_sequences_per_actor": args.inflight}})


def percentiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}_s": float(np.percentile(values, q)) for q in (50, 90, 99)} | {"max_s": float(max(values))}


# ------------------------------------------------------------------------------------- timelines
def request_timing(prompt_id: str, metrics, received: float) -> dict:
    """A finished request's timeline from vLLM's per-request stats (`RequestOutput.metrics`, of the group's
    last child to finish): queued, scheduled, first and last token, on the engine core's `time.monotonic()`,
    the clock every process of the machine shares; `received` is when the caller's process saw it. None
    when vLLM kept no stats (`disable_log_stats`)."""
    if metrics is None:
        return None
    n, span = metrics.num_generation_tokens, metrics.last_token_ts - metrics.first_token_ts
    return {"id": prompt_id, "tokens": n, "queued": metrics.queued_ts, "scheduled": metrics.scheduled_ts,
            "first": metrics.first_token_ts, "last": metrics.last_token_ts, "received": received,
            "steps_per_s": (n - 1) / span if n > 1 and span > 0 else None}


def timeline_summary(timings: list[dict], start: float) -> dict:
    """What separates a slower engine from a later start: the decode rate requests saw (engine steps/s,
    median and p10), their wait in vLLM's queue, the frontend's lag (last token -> the caller's process
    sees the finished request), and the request that finished last: when it was scheduled, its rate."""
    timings = [t for t in timings if t]
    if not timings:
        return {}
    rates = [t["steps_per_s"] for t in timings if t["steps_per_s"]]
    waits = [t["scheduled"] - t["queued"] for t in timings]
    lags = [t["received"] - t["last"] for t in timings]
    last = max(timings, key=lambda t: t["last"])
    return {"steps_per_s_p50": float(np.median(rates)), "steps_per_s_p10": float(np.percentile(rates, 10)),
            "queue_wait_p50_s": float(np.median(waits)), "queue_wait_max_s": float(max(waits)),
            "lag_p50_ms": 1000 * float(np.median(lags)), "lag_max_ms": 1000 * float(max(lags)),
            "last_id": last["id"], "last_tokens": last["tokens"], "last_scheduled_s": last["scheduled"] - start,
            "last_steps_per_s": last["steps_per_s"]}


# ------------------------------------------------------------------------------------------ bare
def bare(args, cfg, limits: dict[str, int]) -> dict:
    """vLLM alone: AsyncLLM, all requests at once, the same prompt text, images, sampling and limits."""
    from core import vl, vllm_compat

    e, data = cfg.rollout.engine, cfg.data
    processor = vl.load_processor(args.model)
    start = time.perf_counter()
    engine = vllm_compat.make_async_engine(
        args.model, tensor_parallel_size=1, gpu_memory_utilization=e.gpu_memory_utilization,
        max_model_len=e.max_model_len, max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
        enforce_eager=e.enforce_eager, load_format="dummy", seed=0)
    init_s = time.perf_counter() - start
    suppressed = vl.suppressed_token_ids(processor.tokenizer)
    inputs = []
    for p in prompts(args.prompts):
        text = processor.apply_chat_template(vl.build_messages(p.problem, format_prompt=data.format_prompt),
                                             add_generation_prompt=True, tokenize=False)
        image = vl.prepare_image(p.image, min_pixels=data.min_pixels, max_pixels=data.max_pixels)
        params = vllm_compat.sampling_params(n=args.n, temperature=1.0, top_p=1.0, max_tokens=limits[p.id], seed=0,
                                             suppressed=suppressed)
        inputs.append((p.id, vllm_compat.multimodal_prompt(text, image), params))

    timings = []

    async def one(tag, prompt_id, prompt, params):
        t0, final = time.perf_counter(), None
        async for out in engine.generate(prompt, params, request_id=tag):
            final = out
        timings.append(request_timing(prompt_id, final.metrics, time.monotonic()))
        return sum(len(o.token_ids) for o in final.outputs), time.perf_counter() - t0, time.perf_counter()

    async def run(batch, tag):
        return await asyncio.gather(*[one(f"{tag}{i}", *item) for i, item in enumerate(batch)])

    loop = asyncio.new_event_loop()
    loop.run_until_complete(run(inputs[:args.warmup], "warm"))
    timings.clear()
    start, anchor = time.perf_counter(), time.monotonic()
    done = loop.run_until_complete(run(inputs, "run"))
    seconds = time.perf_counter() - start
    engine.shutdown()
    leftover = asyncio.all_tasks(loop)  # vLLM's output handler: ended here, not by a closed loop's error at exit
    for task in leftover:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
    loop.close()
    gc.collect()
    tokens = sum(t for t, _, _ in done)
    return {"mode": "bare vLLM", "init_s": init_s, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds, **token_times([(end - start, t) for t, _, end in done]),
            **percentiles([s for _, s, _ in done]), **timeline_summary(timings, anchor)}


def token_times(completions: list[tuple[float, int]]) -> dict[str, float]:
    """When 50 % and 90 % of a run's output tokens had come back, in seconds from its start, from
    (finish offset, tokens) per request: a run slower throughout has both later than another; a run that
    loses only its tail has them close and a longer wall."""
    total, done, out = sum(t for _, t in completions), 0, {}
    for at, tokens in sorted(completions):
        done += tokens
        for q in (50, 90):
            if done >= total * q / 100:
                out.setdefault(f"t{q}_s", at)
    return out


# -------------------------------------------------------------------------------------- in actor
def build_long_tail_engine(*, cfg, model_path: str, limits: dict[str, int]):
    """Runs in the actor: the system's vLLM engine with each prompt's own token limit."""
    from actors.vllm_engine import VLLMEngine

    class LongTailEngine(VLLMEngine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.timings, generate = [], self.engine.generate

            async def timed(prompt, params, request_id):  # records each finished request's timeline
                async for out in generate(prompt, params, request_id=request_id):
                    if out.finished:
                        self.timings.append(request_timing(params.extra_args["id"], out.metrics, time.monotonic()))
                    yield out

            self.engine.generate = timed

        def params(self, prompt, sampling, seed):
            params = super().params(prompt, dataclasses.replace(sampling, max_new_tokens=limits[prompt.id]), seed)
            params.extra_args = {"id": prompt.id}
            return params

        def take_timings(self) -> list[dict]:
            out, self.timings = self.timings, []
            return out

    return LongTailEngine(model_path, cfg=cfg.rollout.engine, data=cfg.data, seed=cfg.run.seed)


def _take_timings(actor) -> list[dict]:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: self.engine.take_timings()), timeout=60)


def _process_facts(actor) -> dict:
    """The actor process's CPU settings (inherited by vLLM's engine core), beside this process's."""
    import os

    import ray

    def facts(_=None) -> dict:
        import torch

        return {"omp": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
                "cpus": len(os.sched_getaffinity(0))}

    return {"driver": facts(), "actor": ray.get(actor.__ray_call__.remote(facts), timeout=60)}


class _Counting:
    """The dispatch loop's buffer and scorer for a benchmark: reserves `total` prompts then closes; keeps
    every group it is given (no judge: rewards are not what is measured)."""

    def __init__(self, total: int) -> None:
        self.left, self.groups, self.finished = total, [], []

    async def reserve(self, n: int) -> bool:
        if self.left < n:
            return False
        self.left -= n
        return True

    async def release(self, n: int) -> None:
        raise RuntimeError(f"{n} prompts failed in generation: see the actor's log")

    async def put(self, scored) -> bool:
        self.groups.append(scored.group)
        self.finished.append(time.perf_counter())
        return True

    async def score(self, group):
        from core.records import RewardBreakdown, ScoredGroup

        zero = RewardBreakdown(accuracy=0.0, format=0.0, repetition=0.0, visual=0.0, total=0.0, overall=0.0)
        return ScoredGroup(group=group, rewards=(zero,) * len(group.rollouts), judge_seconds=0.0)


def dispatch(cfg, actor, batch: list) -> tuple[list, float, list[float]]:
    """The driver's dispatch loop over `batch` on one actor: (groups, seconds, each group's finish offset)."""
    from perception_r1.adapters import RayGenerator
    from perception_r1.orchestrator import DispatchSettings, Orchestrator
    from perception_r1.stream import PromptStream

    r = cfg.rollout
    counting = _Counting(len(batch))
    settings = DispatchSettings(prompts_per_call=r.prompts_per_call, inflight_sequences_per_actor=r.inflight_target,
                                samples_per_prompt=r.samples_per_prompt, drop_uniform_groups=False)
    orchestrator = Orchestrator(stream=PromptStream(batch, shuffle_seed=None), generators=[RayGenerator(actor)],
                                scorer=counting, buffer=counting, settings=settings)

    async def run():
        await orchestrator.run()
        await orchestrator.drain(timeout_s=1800)

    start = time.perf_counter()
    asyncio.run(run())
    seconds = time.perf_counter() - start
    assert len(counting.groups) == len(batch), (len(counting.groups), len(batch), orchestrator.counters)
    return counting.groups, seconds, [at - start for at in counting.finished]


def in_actor(args, cfg, limits: dict[str, int]) -> list[dict]:
    import ray

    from actors.actor import remote_class
    from core.records import Sampling

    ray.init(include_dashboard=False)
    r = cfg.rollout
    start = time.perf_counter()
    actor = remote_class(generate_concurrency=r.calls_per_actor).options(num_gpus=1).remote(
        actor_id=0, build_engine=functools.partial(build_long_tail_engine, cfg=cfg, model_path=args.model, limits=limits),
        sampling=Sampling(args.n, 1.0, 1.0, args.max_tokens))
    ray.get(actor.version.remote())
    init_s = time.perf_counter() - start
    batch = prompts(args.prompts)
    print("processes:", _process_facts(actor))
    dispatch(cfg, actor, batch[:args.warmup])
    _take_timings(actor)
    anchor = time.monotonic()
    measured = dispatch(cfg, actor, batch)
    rows = [_row("generation actor", init_s, *measured, timeline_summary(_take_timings(actor), anchor))]
    if args.one_call:
        anchor = time.monotonic()
        measured = one_call(actor, batch)
        rows.append(_row("actor, one call", init_s, *measured, timeline_summary(_take_timings(actor), anchor)))
    ray.shutdown()
    return rows


def one_call(actor, batch: list) -> tuple[list, float, list[float]]:
    """Every prompt in one streaming call (the bare run's submission, inside the actor): separates the cost
    of the actor process from the cost of dispatch."""
    import ray

    start, groups, finished = time.perf_counter(), [], []
    for ref in actor.stream.remote(batch):
        groups.append(ray.get(ref, timeout=1800)[1])
        finished.append(time.perf_counter() - start)
    return groups, time.perf_counter() - start, finished


def _row(mode: str, init_s: float, groups: list, seconds: float, finished: list[float], timeline: dict) -> dict:
    tokens = sum(g.num_completion_tokens for g in groups)
    return {"mode": mode, "init_s": init_s, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            **token_times([(at, g.num_completion_tokens) for at, g in zip(finished, groups)]),
            **percentiles([g.generate_seconds for g in groups]), **timeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--per-call", type=int, default=8, help="rollout.prompts_per_call (the recipe's 8)")
    parser.add_argument("--inflight", type=int, default=None,
                        help="rollout.inflight_sequences_per_actor (default: max_num_seqs + one call)")
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=2048, help="cap of the long-tailed token limits")
    parser.add_argument("--median-tokens", type=int, default=300)
    parser.add_argument("--sigma", type=float, default=0.8, help="log-normal sigma of the token limits")
    parser.add_argument("--warmup", type=int, default=16, help="prompts run once before each measurement")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--one-call", action="store_true",
                        help="also every prompt in one call to the actor (actor-process cost without dispatch)")
    args = parser.parse_args()
    cfg = config(args)
    limits = token_limits([p.id for p in prompts(args.prompts)], median=args.median_tokens, sigma=args.sigma,
                          cap=args.max_tokens)
    values = list(limits.values())
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    print(f"token limits: mean {np.mean(values):.0f}, p50 {p50:.0f}, p90 {p90:.0f}, p99 {p99:.0f}, max {max(values)}")
    rows = [bare(args, cfg, limits), *in_actor(args, cfg, limits)]
    print_table(f"vLLM in a generation actor (driver dispatch, streamed groups) vs bare ({args.model})", rows)
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"vllm_in_actor_ratio = {ratio:.3f}  (in-flight target {cfg.rollout.inflight_target} sequences, "
          f"{cfg.rollout.prompts_per_call} prompts per call)")
    print("wrote", write_result("vllm_in_actor", config=vars(args) | {
        "inflight_target": cfg.rollout.inflight_target, "token_limit_mean": float(np.mean(list(limits.values())))},
        metrics={"vllm_in_actor_ratio": ratio, "bare": rows[0], "actor": rows[1]}
        | ({"actor_one_call_ratio": rows[2]["tokens_per_s"] / rows[0]["tokens_per_s"], "actor_one_call": rows[2]}
           if len(rows) > 2 else {})))


if __name__ == "__main__":
    main()
