"""`perception-r1 train CONFIG`: validate the config (instantly, before torch or Ray load), then run."""

from __future__ import annotations

import argparse
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/demo-cpu.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint of this run (and its mlflow run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run.num_steps=5 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the placement plan and the learner's memory estimate, start nothing; exit 0 "
                             "when the run fits, 2 with its problems listed when not")


def run(args: argparse.Namespace) -> int:
    from core.config_files import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from perception_r1.dry_run import dry_run

        return dry_run(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from perception_r1.run_lock import RunLock

    RunLock(cfg.run_dir).check_free()  # a busy run folder is refused before torch and Ray are imported
    from perception_r1.driver import RunFailed, train
    from perception_r1.stop_signals import Interrupted

    try:
        result = train(cfg, resume=args.resume)
    except Interrupted as e:
        print(f"perception-r1 train: stopped: {e}", file=sys.stderr)
        return 130
    except RunFailed as e:
        print(f"perception-r1 train: run failed: {e}", file=sys.stderr)
        return 1
    print(f"done: version {result.final_version}, {result.steps_logged} steps logged to mlflow run "
          f"{result.mlflow_run_id}; run folder {result.run_dir}" + (" (stopped early)" if result.stopped_early else ""))
    return 130 if result.stopped_early else 0
