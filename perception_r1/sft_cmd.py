"""`perception-r1 sft CONFIG`: only the supervised warm start of a config (cached; `train` reuses it)."""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config whose model, data and sft sections to use")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set sft.num_steps=50 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from core.config_files import load_config

    cfg = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from perception_r1.driver import resolve_model, split_prompts, warm_start

    out = warm_start(cfg, resolve_model(cfg), split_prompts(cfg)[0])  # held-out prompts stay unseen
    print(f"sft model: {out}  (use it with: model: {{type: pretrained, path: {out}}})")
    return 0
