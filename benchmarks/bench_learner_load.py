"""The learner's model load, per rank: transformers' `from_pretrained` (fp32, the old path: every rank held
the whole model on the host) against the sharded load (learner/sharded_load.py: meta device, FSDP2, each
rank reads its own slices), in 1 process and in N gloo ranks. A Qwen2.5-VL scaled from the tiny model's
config (random weights, saved in bf16 like the real folders); each measurement in a fresh process, so the
peak resident memory (ru_maxrss) is that load's, counted above the process's memory once torch and
transformers are imported (resident memory before the load, high-water mark after it).

    python -m benchmarks.bench_learner_load --layers 16 --hidden 1024 --ranks 2
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

from benchmarks.common import print_table, write_result


def build_folder(out: Path, *, layers: int, hidden: int, vocab: int) -> Path:
    from transformers import AutoConfig, AutoModelForImageTextToText

    from core.config import TinyModelConfig
    from perception_r1.tiny_model import build_tiny_model

    config = AutoConfig.from_pretrained(build_tiny_model(TinyModelConfig(cache_dir=str(out / "tiny"))))
    heads = hidden // 32  # the tiny model's head_dim (its mrope sections fit it)
    config.text_config.update({"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
                               "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 8),
                               "vocab_size": vocab, "layer_types": ["full_attention"] * layers})
    config.vision_config.out_hidden_size = hidden
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out / "model")
    return out / "model"


def _measure(rank: int, world: int, port: int, mode: str, folder: str, out: str) -> None:
    import transformers  # imported before the baseline, as in a learner worker

    from core.config import LearnerConfig
    from learner.policy import load_policy

    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world, timeout=timedelta(seconds=600))
    base = _resident_bytes()
    start = time.perf_counter()
    if mode == "from_pretrained":
        model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).to("cpu")
        read = sum(p.numel() * 2 for p in model.parameters())
    else:
        model, stats = load_policy(folder, cfg=LearnerConfig(), device=torch.device("cpu"))
        read = stats.read_bytes
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(out, f"{mode}-{world}-{rank}.json").write_text(json.dumps(
        {"mode": mode, "ranks": world, "rank": rank, "seconds": seconds, "read_gib": read / 2**30,
         "baseline_gib": base / 2**30, "peak_gib": peak / 2**30, "load_peak_gib": (peak - base) / 2**30}))
    if world > 1:
        torch.distributed.destroy_process_group()


def _resident_bytes() -> int:
    """The process's resident memory now (VmRSS), not its high-water mark."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def run(mode: str, world: int, folder: Path, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_measure, args=(world, port, mode, str(folder), str(out)), nprocs=world, start_method="spawn")
    return [json.loads((out / f"{mode}-{world}-{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp), layers=args.layers, hidden=args.hidden, vocab=args.vocab)
        file_gib = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**30
        rows = (run("from_pretrained", 1, folder, Path(tmp)) + run("sharded", 1, folder, Path(tmp))
                + run("sharded", args.ranks, folder, Path(tmp)))
    print_table(f"learner load, a {file_gib:.2f} GiB bf16 folder (fp32 in memory: {2 * file_gib:.2f} GiB)", rows)
    write_result("learner_load", config=vars(args) | {"file_gib": file_gib}, metrics={"rows": rows})


if __name__ == "__main__":
    main()
