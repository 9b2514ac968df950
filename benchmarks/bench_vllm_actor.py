"""vLLM throughput inside a generation actor vs bare vLLM: same model, prompts, sampling and GPU.
Bare: one AsyncLLM in this process with every prompt submitted at once. In-actor: the system's
GenerationActor (Ray) fed by concurrent generate calls as the driver feeds it. Output tokens/s each.

    python -m benchmarks.bench_vllm_actor DIR/vl7b --prompts 64 --n 8 --max-tokens 512
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import time

from benchmarks.common import print_table, write_result


def prompts(count: int):
    from core.config import SyntheticDataConfig
    from dataprep.synthetic import make_problems

    return make_problems(SyntheticDataConfig(num_problems=count, seed=11))


def engine_cfg(args):
    from core.config import VLLMEngineConfig

    return VLLMEngineConfig(load_format="dummy", gpu_memory_utilization=0.85, max_model_len=4096, max_num_seqs=1024,
                      max_num_batched_tokens=8192, enforce_eager=args.eager)


def bare(args) -> dict:
    """vLLM alone: AsyncLLM, all requests at once, the same prompt text, images and sampling."""
    from core import vl, vllm_compat
    from core.config import DataConfig

    cfg, data = engine_cfg(args), DataConfig()
    processor = vl.load_processor(args.model)
    start = time.perf_counter()
    engine = vllm_compat.make_async_engine(
        args.model, tensor_parallel_size=1, gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len, max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens, enforce_eager=cfg.enforce_eager, load_format="dummy",
        seed=0)
    init_s = time.perf_counter() - start
    params = vllm_compat.sampling_params(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, seed=0,
                                         suppressed=vl.suppressed_token_ids(processor.tokenizer))
    inputs = []
    for p in prompts(args.prompts):
        text = processor.apply_chat_template(vl.build_messages(p.problem, format_prompt=data.format_prompt),
                                             add_generation_prompt=True, tokenize=False)
        inputs.append(vllm_compat.multimodal_prompt(text, vl.prepare_image(
            p.image, min_pixels=data.min_pixels, max_pixels=data.max_pixels)))

    async def one(i, prompt):
        final = None
        async for out in engine.generate(prompt, params, request_id=f"b{i}"):
            final = out
        return sum(len(o.token_ids) for o in final.outputs)

    async def all_prompts(tag):
        return sum(await asyncio.gather(*[one(f"{tag}{i}", p) for i, p in enumerate(inputs)]))

    loop = asyncio.new_event_loop()
    loop.run_until_complete(all_prompts("warm"))
    start = time.perf_counter()
    tokens = loop.run_until_complete(all_prompts("run"))
    seconds = time.perf_counter() - start
    engine.shutdown()
    loop.close()
    del engine
    gc.collect()
    return {"mode": "bare vLLM", "init_s": init_s, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def in_actor(args) -> dict:
    import ray

    from actors.actor import remote_class
    from core.config_files import parse_config
    from core.records import Sampling
    from perception_r1.driver import build_engine

    ray.init(include_dashboard=False)
    cfg = parse_config({"model": {"type": "pretrained", "path": args.model, "random_weights": True},
                        "rollout": {"engine": engine_cfg(args).model_dump(), "num_gpus_per_actor": 1}})
    calls = args.prompts // args.per_call
    start = time.perf_counter()
    actor = remote_class(generate_concurrency=calls).options(num_gpus=1).remote(
        actor_id=0, build_engine=functools.partial(build_engine, cfg=cfg, model_path=args.model),
        sampling=Sampling(args.n, 1.0, 1.0, args.max_tokens))
    ray.get(actor.version.remote())
    init_s = time.perf_counter() - start
    batches = [prompts(args.prompts)[i * args.per_call:(i + 1) * args.per_call] for i in range(calls)]

    def run():
        groups = ray.get([actor.generate.remote(b) for b in batches])
        return sum(g.num_completion_tokens for call in groups for g in call)

    run()  # warm-up, as for bare
    start = time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"mode": "generation actor", "init_s": init_s, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--per-call", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--eager", action="store_true")
    args = parser.parse_args()
    rows = [bare(args), in_actor(args)]
    print_table(f"vLLM in a generation actor vs bare ({args.model})", rows)
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"vllm_in_actor_ratio = {ratio:.3f}")
    print("wrote", write_result("vllm_in_actor", config=vars(args),
                                metrics={"vllm_in_actor_ratio": ratio, "bare": rows[0], "actor": rows[1]}))


if __name__ == "__main__":
    main()
