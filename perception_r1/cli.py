"""`perception-r1` command line: parses arguments (and configs) before importing torch, Ray or vLLM,
so `--help` and config errors are instant. Each subcommand lives in its own module, imported only
when chosen: the module provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": ("perception_r1.train_cmd", "run the asynchronous actor-learner GRPO training job"),
    "sft": ("perception_r1.sft_cmd", "supervised warm start on worked solutions"),
    "prepare-data": ("perception_r1.prepare_data_cmd", "CoT distillation, accuracy filter, visual-annotation extraction"),
    "eval": ("perception_r1.eval_cmd", "evaluate a model on multimodal math benchmarks"),
    "export": ("perception_r1.export_cmd", "write a run's checkpoint as a model folder (bf16 safetensors, config, processor)"),
    "mcnemar": ("perception_r1.mcnemar_cmd", "exact McNemar test between two evaluation JSONL files"),
    "build-tiny-model": ("perception_r1.tiny_model_cmd", "build the tiny random Qwen2.5-VL used by the demo and tests"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="perception-r1", description="Asynchronous actor-learner GRPO for vision-language models, on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    modules = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen subcommand's module is imported
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except ValueError as e:  # user errors: one clear message, no traceback
        print(f"perception-r1 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
