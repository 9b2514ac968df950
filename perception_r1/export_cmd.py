"""`perception-r1 export`: a run's checkpoint as a model folder (bf16 safetensors, config, processor files)
that transformers, vLLM and `perception-r1 eval --model-path` load.

    perception-r1 export runs/demo-cpu runs/demo-cpu-model               # the newest complete checkpoint
    perception-r1 export runs/qwen7b --step 40 exports/qwen7b-step40 --force
"""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (<run.output_dir>/<run.name>)")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the model folder to write (new or empty)")
    parser.add_argument("--step", type=int, default=None,
                        help="the checkpoint's step (default: the newest complete checkpoint)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the saved weights")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")


def run(args: argparse.Namespace) -> int:
    run_dir, out_dir = Path(args.run_dir), Path(args.out_dir)
    if not run_dir.is_dir():
        raise ValueError(f"RUN_DIR {run_dir} is not a folder; give <run.output_dir>/<run.name> of a training run")
    import torch

    from perception_r1.export import export

    done = export(run_dir, out_dir, step=args.step, dtype=getattr(torch, args.dtype), force=args.force)
    print(f"exported {done.checkpoint} (step {done.step}, policy_version {done.policy_version}) to {done.out_dir}")
    return 0
