"""`perception-r1 build-tiny-model`: build (or find cached) the tiny random Qwen2.5-VL and print its folder."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", nargs="?", default=None,
                        help="folder to build under (default: the config's model.cache_dir, else .cache/tiny-qwen2_5_vl); "
                             "the model goes in a subfolder named by its config hash, printed at the end")
    parser.add_argument("--config", default=None, help="a YAML config whose `model:` section is `type: tiny`")


def run(args: argparse.Namespace) -> int:
    from core.config import TinyModelConfig
    from core.config_files import load_config

    cfg = load_config(args.config).model if args.config else TinyModelConfig()
    if not isinstance(cfg, TinyModelConfig):
        raise ValueError(f"{args.config}: model.type is {cfg.type!r}; build-tiny-model needs `model: {{type: tiny}}`")
    if args.output_dir is not None:
        cfg = cfg.model_copy(update={"cache_dir": args.output_dir})
    from perception_r1.tiny_model import (
        build_tiny_model,  # after parsing: torch and transformers load here
    )

    print(build_tiny_model(cfg))
    return 0
