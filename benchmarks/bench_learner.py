"""Learner throughput and MFU: the system's Learner (FSDP2 over N GPUs, bf16 compute, fp32 master
weights, activation checkpointing, AdamW) on Qwen2.5-VL shapes with random weights, on GRPO batches
of synthetic geometry prompts (real images) with random completions.

    python -m benchmarks.bench_learner DIR/vl3b --gpus 1 --completion 1024
MFU = model FLOPs (6 x params x tokens + attention 12 x layers x hidden x seq x tokens) / (time x peak).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.multiprocessing as mp

from benchmarks.common import print_table, write_result

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def batch(model_path: str, *, groups: int, n: int, completion: int, seed: int):
    import numpy as np

    from core import vl
    from core.config import DataConfig, SyntheticDataConfig
    from core.records import RewardBreakdown, Rollout, RolloutGroup, ScoredGroup
    from dataprep.synthetic import make_problems

    processor, data = vl.load_processor(model_path), DataConfig()
    rng = np.random.default_rng(seed)
    out = []
    for prompt in make_problems(SyntheticDataConfig(num_problems=groups, seed=seed)):
        ids = vl.encode_prompt(processor, prompt, data=data).input_ids.numpy().astype(np.int32)
        rollouts = tuple(Rollout(rng.integers(300, 150000, completion, dtype=np.int32),
                                 np.full(completion, -11.0, np.float32), "", "length", 0, 0) for _ in range(n))
        rewards = tuple(RewardBreakdown(0, 0, 0, 0, float(i % 3), 0.0) for i in range(n))
        out.append(ScoredGroup(RolloutGroup(prompt, ids, rollouts, 0, 0.0), rewards, 0.0))
    return out


def worker(rank: int, world: int, args, queue) -> None:
    import torch.distributed as dist

    from core.config import DataConfig, LearnerConfig
    from learner.trainer import Learner

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    cfg = LearnerConfig(num_gpus_per_worker=1, dtype="bfloat16", gradient_checkpointing=True,
                        max_tokens_per_micro_batch=args.micro_tokens, attn_implementation="sdpa",
                        optimizer={"lr": 1e-6, "warmup_steps": 0})
    learner = Learner(args.model, cfg=cfg, data=DataConfig(), temperature=1.0, device=torch.device("cuda"),
                      random_weights=True)
    groups = batch(args.model, groups=args.groups, n=args.n, completion=args.completion, seed=rank)
    params = sum(p.numel() for p in learner.model.parameters()) if world == 1 else None
    times, tokens = [], 0
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = learner.step(groups)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens = sum(len(g.group.prompt_token_ids) + args.completion for g in groups for _ in range(args.n))
    peak_mem = torch.cuda.max_memory_allocated() / 2**30
    if rank == 0:
        queue.put({"seconds": sum(times) / len(times), "tokens_per_rank": tokens, "peak_mem_gib": peak_mem,
                   "loss": metrics["learner/loss"], "grad_norm": metrics["learner/grad_norm"], "params": params})
    dist.destroy_process_group()


def model_flops_per_token(config: dict, seq: int) -> tuple[float, int]:
    """(training FLOPs per token, language-model params): 6N + 12 * layers * hidden * seq (attention)."""
    h, layers, inter, vocab = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * inter
    n = layers * per_layer + vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return 6 * n + 12 * layers * h * seq, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--groups", type=int, default=4, help="prompts per rank per step")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--completion", type=int, default=1024)
    parser.add_argument("--micro-tokens", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(args.gpus, args, queue), nprocs=args.gpus, join=True)
    out = queue.get()
    config = json.loads(open(os.path.join(args.model, "config.json")).read())
    seq = out["tokens_per_rank"] / (args.groups * args.n)
    flops_per_token, n_params = model_flops_per_token(config, int(seq))
    tokens_per_s = out["tokens_per_rank"] * args.gpus / out["seconds"]
    gpu = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), 989.4) * 1e12
    mfu = flops_per_token * tokens_per_s / (peak * args.gpus)
    row = {"model": os.path.basename(args.model.rstrip("/")), "gpus": args.gpus, "seq_len": seq,
           "step_s": out["seconds"], "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_mem_gib": out["peak_mem_gib"],
           "lm_params_b": n_params / 1e9}
    print_table("learner throughput", [row])
    name = args.name or f"learner_{row['model']}_{args.gpus}gpu"
    print("wrote", write_result(name, config=vars(args), metrics={"learner_mfu": mfu, **row, **out}))


if __name__ == "__main__":
    main()
