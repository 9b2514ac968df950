"""Weight sync at 7B: the learner (FSDP2-wrapped fp32 master weights on GPU 0) gathers, casts to bf16
and broadcasts every tensor over vLLM's NCCL group into a running vLLM engine (dummy weights) on
GPU 1, which pauses, loads and resumes. Timed end to end as the learner sees it (gather + wire +
load + the engines' acknowledgements), several rounds, checked for equality after each.

    python -m benchmarks.bench_weight_sync DIR/vl7b --rounds 4
"""

from __future__ import annotations

import argparse
import functools
import os

import ray
import torch

from benchmarks.common import print_table, write_result

CHECK = ["embed_tokens.weight", "lm_head.weight", "layers.27.mlp.down_proj.weight", "layers.0.self_attn.o_proj.weight",
         "blocks.31.mlp.down_proj.weight"]


@ray.remote(num_gpus=1)
class SyncLearner:
    def __init__(self, model_path: str, receivers: list, bucket_mb: int) -> None:
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
                                        device=torch.device("cuda"), transport="vllm")
        self.connect_s = self.sender.connect()

    def round(self, version: int) -> dict:
        from torch.distributed.tensor import DTensor

        from core.weights import weight_corners

        with torch.no_grad():  # every tensor changes, as after an optimizer step
            for p in self.model.parameters():
                local = p.to_local() if isinstance(p, DTensor) else p
                local.add_(0.01)
        torch.cuda.synchronize()
        seconds, nbytes = self.sender.broadcast(self.model, version=version)
        full = {n: (t.full_tensor() if isinstance(t, DTensor) else t).to(torch.bfloat16)
                for n, t in self.model.state_dict().items() if any(n.endswith(c) for c in CHECK)}
        return {"seconds": seconds, "bytes": nbytes, "expected": weight_corners(full.items(), CHECK)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--bucket-mb", type=int, default=1024)
    parser.add_argument("--eager", action="store_true", help="enforce_eager in vLLM (faster start)")
    args = parser.parse_args()
    from actors.actor import remote_class
    from core.config_files import parse_config
    from core.records import Sampling
    from perception_r1.driver import build_engine

    ray.init(include_dashboard=False, runtime_env={"env_vars": {"NCCL_NVLS_ENABLE": "0"}})
    cfg = parse_config({"model": {"type": "pretrained", "path": args.model, "random_weights": True},
                        "rollout": {"engine": {"type": "vllm", "load_format": "dummy", "enforce_eager": args.eager,
                                               "gpu_memory_utilization": 0.6, "max_model_len": 4096},
                                    "num_gpus_per_actor": 1}})
    actor = remote_class(generate_concurrency=1).options(num_gpus=1).remote(
        actor_id=0, build_engine=functools.partial(build_engine, cfg=cfg, model_path=args.model),
        sampling=Sampling(1, 1.0, 1.0, 8))
    learner = SyncLearner.remote(args.model, [actor], args.bucket_mb)
    rows = []
    for version in range(1, args.rounds + 1):
        out = ray.get(learner.round.remote(version))
        got_version, got = ray.get(actor.weight_samples.remote(CHECK))
        rows.append({"round": version, "seconds": out["seconds"], "GB": out["bytes"] / 1e9,
                     "GB_per_s": out["bytes"] / 1e9 / out["seconds"],
                     "equal": got_version == version and got == out["expected"] and len(got) == len(CHECK)})
    print_table(f"weight sync learner GPU -> vLLM GPU ({args.model})", rows)
    steady = rows[1:] or rows
    metrics = {"weight_sync_7b_s": min(r["seconds"] for r in steady),
               "weight_sync_mean_s": sum(r["seconds"] for r in steady) / len(steady),
               "gbytes": rows[0]["GB"], "all_equal": all(r["equal"] for r in rows), "rounds": rows}
    print("wrote", write_result("weight_sync_7b", config=vars(args), metrics=metrics))
    ray.shutdown()


if __name__ == "__main__":
    main()
