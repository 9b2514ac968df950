"""Learner throughput and MFU: the system's Learner (FSDP2 over N GPUs, bf16 compute, fp32 master
weights, AdamW) on Qwen2.5-VL shapes with random weights, on GRPO batches of synthetic geometry
prompts (real images) with random completions. One model load measures, on the same batches:

- `mix`: completion lengths drawn log-normally and clipped to [100, 4096]; the padded path as it ran
  before packing (padded micro-batches, every block checkpointed, the vision tower's per-window
  attention loop, full logits) against the packed path -> `learner_mix_speedup` (tokens/s ratio);
- `mfu`: every completion `--completion` tokens long, the packed path under each activation-
  checkpointing setting (all blocks / every 2nd / none) -> `learner_mfu` of the fastest that fits;
- optionally (a case ending `:compile`) a setting again with each block compiled.

    python -m benchmarks.bench_learner DIR/vl3b --gpus 1 --completion 1024
MFU = model FLOPs (6 x params x tokens + attention 12 x layers x hidden x seq x tokens) / (time x peak),
language model only (the vision tower's FLOPs are not counted), as in the earlier results.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch
import torch.multiprocessing as mp

from benchmarks.common import print_table, write_result

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
CHECKPOINTING = {"all": 1, "every2": 2, "none": 0}
"""Activation checkpointing settings measured: checkpoint every k-th block (0: none)."""


def batch(model_path: str, *, groups: int, n: int, completion: int | None, seed: int):
    """`groups` prompts x `n` random completions: `completion` tokens each, or (None) log-normal
    lengths (median 800, sigma 1) clipped to [100, 4096]."""
    import numpy as np

    from core import vl
    from core.config import DataConfig, SyntheticDataConfig
    from core.records import RewardBreakdown, Rollout, RolloutGroup, ScoredGroup
    from dataprep.synthetic import make_problems

    processor, data = vl.load_processor(model_path), DataConfig()
    vocab = min(150000, len(processor.tokenizer) - 20)
    rng = np.random.default_rng(seed)
    out = []
    for prompt in make_problems(SyntheticDataConfig(num_problems=groups, seed=seed)):
        ids = vl.encode_prompt(processor, prompt, data=data).input_ids.numpy().astype(np.int32)
        lengths = ([completion] * n if completion else
                   np.clip(rng.lognormal(np.log(800), 1.0, n), 100, 4096).astype(int).tolist())
        rollouts = tuple(Rollout(rng.integers(300, vocab, t, dtype=np.int32), np.full(t, -11.0, np.float32), "",
                                 "length", 0, 0) for t in lengths)
        rewards = tuple(RewardBreakdown(0, 0, 0, 0, float(i % 3), 0.0) for i in range(n))
        out.append(ScoredGroup(RolloutGroup(prompt, ids, rollouts, 0, 0.0), rewards, 0.0))
    return out


def set_path(learner, *, packed: bool, every: int) -> None:
    """Switch the loaded learner between the packed and the padded path and set checkpointing."""
    from learner.varlen import set_vision_varlen

    learner.packed = packed
    set_vision_varlen(learner.model, enabled=packed)
    for blocks in (learner.model.model.visual.blocks, learner.model.model.language_model.layers):
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = every > 0 and i % every == 0


def measure(learner, groups, *, warmup: int, steps: int, device: torch.device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        sync()
        start = time.perf_counter()
        metrics = learner.step(groups)
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    tokens = sum(len(g.group.prompt_token_ids) + len(r.token_ids) for g in groups for r in g.group.rollouts)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return {"seconds": sum(times) / len(times), "tokens": tokens, "seqs": sum(len(g.group.rollouts) for g in groups),
            "peak_mem_gib": peak, "loss": metrics["learner/loss"], "grad_norm": metrics["learner/grad_norm"]}


def run_case(name: str, results: dict, fn) -> None:
    try:
        results[name] = fn()
        print(name, results[name], flush=True)
    except Exception as e:  # noqa: BLE001 -- an OOM or a failing variant is a result, the rest still runs
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def worker(rank: int, world: int, args, queue) -> None:
    import torch.distributed as dist

    from core.config import DataConfig, LearnerConfig
    from learner.trainer import Learner

    cuda = torch.cuda.is_available()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", LOCAL_RANK=str(rank))
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda" if cuda else "cpu")
    cfg = LearnerConfig(num_gpus_per_worker=int(cuda), dtype="bfloat16" if cuda else "float32",
                        gradient_checkpointing=True, max_tokens_per_micro_batch=args.micro_tokens,
                        attn_implementation="sdpa", packing="always", optimizer={"lr": 1e-6, "warmup_steps": 0})
    learner = Learner(args.model, cfg=cfg, data=DataConfig(), temperature=1.0, device=device, random_weights=True)
    from learner.varlen import probe_native_gqa

    results: dict = {"params": sum(p.numel() for p in learner.model.parameters()) if world == 1 else None,
                     "varlen_native_gqa": probe_native_gqa(torch.device("cuda", rank)) if cuda else None}
    batches = {"mix": batch(args.model, groups=args.groups, n=args.n, completion=None, seed=100 + rank),
               "mfu": batch(args.model, groups=args.groups, n=args.n, completion=args.completion, seed=rank)}
    eager = [c for c in args.cases if not c.endswith(":compile")]
    for case in eager + ["profile"] + [c for c in args.cases if c not in eager]:
        if case == "profile":
            if args.profile:
                run_case("profile", {}, lambda: profile(learner, args.profile, batches, device=device))
            continue
        run_case(case, results, lambda case=case: run_spec(learner, case, batches, args=args, device=device))
        if rank == 0 and args.out_dir:  # what was measured survives a later case that hangs
            with open(os.path.join(args.out_dir, "partial.json"), "w") as f:
                json.dump(results, f, indent=1)
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def run_spec(learner, spec: str, batches: dict, *, args, device: torch.device) -> dict:
    """A case `BATCH:PATH:CHECKPOINTING:MICRO_TOKENS[:compile]`, e.g. `mix:old:all:16384`,
    `mfu:new:none:8192:compile` (compiling is for good: later cases run compiled too)."""
    name, path, checkpointing, micro, *rest = spec.split(":")
    set_path(learner, packed=path == "new", every=CHECKPOINTING[checkpointing])
    learner.cfg = learner.cfg.model_copy(update={"max_tokens_per_micro_batch": int(micro)})
    if rest == ["compile"]:
        for block in list(learner.model.model.visual.blocks) + list(learner.model.model.language_model.layers):
            if block._compiled_call_impl is None:
                block.compile(dynamic=True)
    return measure(learner, batches[name], warmup=args.warmup, steps=args.steps, device=device)


def profile(learner, spec: str, batches: dict, *, device: torch.device) -> None:
    """One step of case `spec` under torch.profiler: the top kernels and the GPU-busy time, printed."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    name, path, checkpointing, micro, *_ = spec.split(":")
    set_path(learner, packed=path == "new", every=CHECKPOINTING[checkpointing])
    learner.cfg = learner.cfg.model_copy(update={"max_tokens_per_micro_batch": int(micro)})
    learner.step(batches[name])
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        learner.step(batches[name])
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6
    print(f"profile {spec}: wall {wall:.3f}s (profiled), kernels {busy:.3f}s")
    print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def model_flops_per_token(config: dict, seq: int) -> tuple[float, int]:
    """(training FLOPs per token, language-model params): 6N + 12 * layers * hidden * seq (attention)."""
    h, layers, inter, vocab = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * inter
    n = layers * per_layer + vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return 6 * n + 12 * layers * h * seq, n


def summarize(out: dict, *, config: dict, gpus: int, peak: float) -> tuple[list[dict], dict]:
    """A table row per case (tokens/s, MFU, peak memory) and the headline metrics."""
    rows, metrics = [], {}
    for name, r in out.items():
        if not isinstance(r, dict) or "seconds" not in r:
            continue
        seq = r["tokens"] / r["seqs"]
        flops_per_token, n_params = model_flops_per_token(config, int(seq))
        tokens_per_s = r["tokens"] * gpus / r["seconds"]
        rows.append({"case": name, "seq_len": seq, "step_s": r["seconds"], "tokens_per_s": tokens_per_s,
                     "mfu": flops_per_token * tokens_per_s / (peak * gpus), "peak_mem_gib": r["peak_mem_gib"]})
        metrics["lm_params_b"] = n_params / 1e9
    new = [row for row in rows if row["case"].startswith("mix:new")]
    old = [row for row in rows if row["case"].startswith("mix:old")]
    mfu_rows = [row for row in rows if row["case"].startswith("mfu:")]
    if mfu_rows:
        best = max(mfu_rows, key=lambda row: row["mfu"])
        metrics.update(learner_mfu=best["mfu"], chosen=best["case"], peak_mem_gib=best["peak_mem_gib"],
                       settings=_settings(best["case"]))
    if new and old:  # the packed path under the chosen settings when the mix ran them, else the first
        setting = best["case"].split(":", 2)[2] if mfu_rows else None
        same = [row for row in new if row["case"].split(":", 2)[2] == setting] or new
        metrics["learner_mix_speedup"] = same[0]["tokens_per_s"] / old[0]["tokens_per_s"]
        metrics["mix_cases"] = [same[0]["case"], old[0]["case"]]
    return rows, metrics


def _settings(case: str) -> dict:
    _, _, checkpointing, micro, *rest = case.split(":")
    return {"gradient_checkpointing": checkpointing != "none", "checkpoint_every": CHECKPOINTING[checkpointing],
            "compile_blocks": rest == ["compile"], "max_tokens_per_micro_batch": int(micro),
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--groups", type=int, default=4, help="prompts per rank per step")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--completion", type=int, default=1024)
    parser.add_argument("--micro-tokens", type=int, default=16384)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=["mix:old:all:16384", "mfu:new:none:20480:compile",
                                                      "mix:new:none:20480:compile"],
                        help="BATCH:PATH:CHECKPOINTING:MICRO_TOKENS[:compile], run in order (see run_spec)")
    parser.add_argument("--profile", default=None, help="a case to run once more under torch.profiler")
    parser.add_argument("--name", default=None)
    parser.add_argument("--out-dir", default=None, help="where the result JSON goes (default benchmarks/results)")
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the learner worker sets it
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(args.gpus, args, queue), nprocs=args.gpus, join=True)
    out = queue.get()
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), 989.4) * 1e12
    rows, metrics = summarize(out, config=config, gpus=args.gpus, peak=peak)
    print_table("learner throughput", rows)
    print(json.dumps(metrics, indent=1))
    name = args.name or f"learner_{os.path.basename(args.model.rstrip('/'))}_{args.gpus}gpu"
    path = write_result(name, config=vars(args), metrics={**metrics, "cases": rows, "raw": out},
                        out_dir=args.out_dir and __import__("pathlib").Path(args.out_dir))
    print("wrote", path)


if __name__ == "__main__":
    main()
