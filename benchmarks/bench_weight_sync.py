"""Weight sync at 7B: the learner (FSDP2-wrapped fp32 master weights on GPU 0) gathers, casts to bf16
and broadcasts every tensor over vLLM's NCCL group into a running vLLM engine (dummy weights) on
GPU 1, which pauses, loads and resumes. Timed end to end as the learner sees it (gather + wire +
load + the engines' acknowledgements), several rounds of each load (sync.nccl_load): `direct` (buckets
into one persistent buffer, the loaders' copies replayed), `layerwise` (vLLM's consumer and layer-wise
reload), and `wire` (the same buckets received and dropped: the floor); checked for equality after each.

`--colocated`: learner and engine share one GPU (half a GPU each in Ray's count) and the weights go by
CUDA IPC (learner/ipc_weights.py): cast into the learner's buffer, then the engine loads from it, each
round once with each load (`direct`, `layerwise`); rows split the time into the cast and the hand-over.

    python -m benchmarks.bench_weight_sync DIR/vl7b --rounds 6
    python -m benchmarks.bench_weight_sync DIR/vl3b --rounds 4 --colocated --eager
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics

import ray
import torch

from benchmarks.common import print_table, write_result

CHECK = ["embed_tokens.weight", "lm_head.weight", "layers.27.mlp.down_proj.weight", "layers.0.self_attn.o_proj.weight",
         "blocks.31.mlp.down_proj.weight"]


@ray.remote
class SyncLearner:
    def __init__(self, model_path: str, receivers: list, bucket_mb: int, transport: str = "vllm") -> None:
        import torch.distributed as dist

        from core.config import LearnerConfig
        from learner.policy import load_policy
        from learner.sync import WeightBroadcaster

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
        dist.init_process_group("nccl", rank=0, world_size=1)  # FSDP2 over one rank, as a 1-GPU learner runs
        cfg = LearnerConfig(num_gpus_per_worker=1, dtype="bfloat16")
        self.model, _ = load_policy(model_path, cfg=cfg, device=torch.device("cuda"), random_weights=True)
        self.sender = WeightBroadcaster(receivers=receivers, rank=0, backend="nccl", timeout_s=300,
                                        bucket_bytes=bucket_mb << 20, dtype=torch.bfloat16,
                                        device=torch.device("cuda"), transport=transport)
        self.connect_s = self.sender.connect()

    def round(self, version: int, load: str = "direct") -> dict:
        from torch.distributed.tensor import DTensor

        from core.weights import weight_corners

        with torch.no_grad():  # every tensor changes, as after an optimizer step
            for p in self.model.parameters():
                local = p.to_local() if isinstance(p, DTensor) else p
                local.add_(0.01)
        torch.cuda.synchronize()
        self.sender.ipc_load = self.sender.nccl_load = load
        seconds, nbytes = self.sender.broadcast(self.model, version=version)
        phases = dict(self.sender.last_phases)
        full = {n: (t.full_tensor() if isinstance(t, DTensor) else t).to(torch.bfloat16)
                for n, t in self.model.state_dict().items() if any(n.endswith(c) for c in CHECK)}
        return {"seconds": seconds, "bytes": nbytes, "expected": weight_corners(full.items(), CHECK), **phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--bucket-mb", type=int, default=1024)
    parser.add_argument("--eager", action="store_true", help="enforce_eager in vLLM (faster start)")
    parser.add_argument("--colocated", action="store_true", help="learner and engine on one GPU, CUDA IPC")
    args = parser.parse_args()
    from actors.actor import remote_class
    from actors.engines import build_engine
    from core.config_files import parse_config
    from core.records import Sampling

    ray.init(include_dashboard=False, runtime_env={"env_vars": {"NCCL_NVLS_ENABLE": "0"}},
             num_gpus=1 if args.colocated else None)
    share = 0.5 if args.colocated else 1
    cfg = parse_config({"model": {"type": "pretrained", "path": args.model, "random_weights": True},
                        "rollout": {"engine": {"type": "vllm", "load_format": "dummy", "enforce_eager": args.eager,
                                               "gpu_memory_utilization": 0.3 if args.colocated else 0.6,
                                               "max_model_len": 4096}, "num_gpus_per_actor": share},
                        "learner": {"num_gpus_per_worker": share, "dtype": "bfloat16",
                                    "gpu_memory_fraction": 0.6 if args.colocated else None}})
    actor = remote_class(generate_concurrency=1).options(num_gpus=share).remote(
        actor_id=0, build_engine=functools.partial(build_engine, cfg=cfg, model_path=args.model),
        sampling=Sampling(1, 1.0, 1.0, 8))
    ray.get(actor.sync_ranks.remote())  # the engine is up before the learner allocates on its GPU
    learner = SyncLearner.options(num_gpus=share).remote(args.model, [actor], args.bucket_mb,
                                                         "ipc" if args.colocated else "vllm")
    # wire: the engine receives every bucket and drops it (the floor: the same bytes, pause and Ray call included)
    loads = ["direct", "layerwise"] if args.colocated else ["direct", "layerwise", "wire"]
    rows = []
    for version in range(1, args.rounds * len(loads) + 1):  # each load's rounds in a row: a replayed direct
        load = loads[(version - 1) // args.rounds]          # load is timed with nothing else touching the engine
        out = ray.get(learner.round.remote(version, load))
        got_version, got = ray.get(actor.weight_samples.remote(CHECK))
        rows.append({"round": version, "load": load, "seconds": out["seconds"], "GB": out["bytes"] / 1e9,
                     "GB_per_s": out["bytes"] / 1e9 / out["seconds"],
                     **{k: v for k, v in out.items() if k.endswith("_s")},
                     "equal": None if load == "wire" else equal(got_version == version, got, out["expected"])})
    where = "the same GPU (CUDA IPC)" if args.colocated else "another GPU (NCCL)"
    print_table(f"weight sync learner -> vLLM engine on {where} ({args.model})", rows)
    name, config, metrics = summary(args, rows, loads)
    print("wrote", write_result(name, config=config, metrics=metrics))
    ray.shutdown()


def equal(version_ok: bool, got: dict, expected: dict) -> bool:
    """The engine's corners equal the learner's for every tensor it has of CHECK (a model with tied embeddings
    has no lm_head of its own in vLLM), and that is at least four of them."""
    return version_ok and len(got) >= 4 and all(expected.get(k) == v for k, v in got.items())


def summary(args, rows: list[dict], loads: list[str]) -> tuple[str, dict, dict]:
    """(result name, config, metrics): per load, the best, mean and median of the rounds after its first."""
    metrics: dict = {"gbytes": rows[0]["GB"], "all_equal": all(r["equal"] for r in rows if r["equal"] is not None),
                     "rounds": rows}
    for load in loads:
        mine = [r for r in rows if r["load"] == load]
        steady = mine[1:] or mine
        metrics[f"{load}_best_s"] = min(r["seconds"] for r in steady)
        metrics[f"{load}_mean_s"] = sum(r["seconds"] for r in steady) / len(steady)
        metrics[f"{load}_median_s"] = statistics.median(r["seconds"] for r in steady)
    if args.colocated:
        best = min(loads, key=lambda load: metrics[f"{load}_best_s"])
        metrics |= {"weight_sync_colocated_s": metrics[f"{best}_best_s"], "best_load": best}
        return "weight_sync_colocated", vars(args), metrics
    best = min(("direct", "layerwise"), key=lambda load: metrics[f"{load}_median_s"])
    metrics |= {"weight_sync_7b_s": metrics[f"{best}_median_s"], "best_load": best,
                "weight_sync_floor_ratio": metrics[f"{best}_median_s"] / metrics["wire_median_s"]}
    return "weight_sync_7b", vars(args), metrics


if __name__ == "__main__":
    main()
