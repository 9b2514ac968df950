"""`perception-r1 eval`: a model on multimodal math benchmarks, scored per item by the reference's LLM
judge and by math-verify, with perception labels; results resume from the output folder.

    perception-r1 eval --benchmark mathvista=data/MathVista --benchmark wemath=data/We-Math/testmini.json \\
        --policy-url http://gpu-host:8000/v1 --policy-model Perception-R1-7B \\
        --judge-url http://judge-host:8001/v1 --judge-model Qwen2.5-72B-Instruct --output-dir runs/eval-pr1
    perception-r1 eval --benchmark synthetic --model-path .cache/tiny --max-tokens 64 --output-dir runs/eval-tiny
    perception-r1 eval --benchmark synthetic --model-path runs/demo-cpu --max-tokens 64 --output-dir runs/eval-demo

--model-path takes a model folder, an export (`perception-r1 export`) or a run folder: a run folder's newest
complete checkpoint is exported once into RUN_DIR/export/step_<N> and evaluated from there.

Writes `results.jsonl` (a line per item), `summary.json`, `table.txt` and `accuracy.png` into
--output-dir and prints the table next to the reference's published numbers. Rerunning the same
command skips items already in results.jsonl. Arguments are checked before anything heavy is
imported; API keys are read only from the environment variables the --*-key-env flags name.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

BENCHMARK_NAMES = ("mathvista", "mathverse", "mathvision", "wemath", "geometry3k", "synthetic")
DEFAULT_MLFLOW_URI = "sqlite:///mlruns.db"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", action="append", required=True, metavar="NAME[=PATH]",
                        help=f"a benchmark and its local file or folder (repeatable); NAME in {', '.join(BENCHMARK_NAMES)}; "
                             "`synthetic` alone generates the synthetic set")
    parser.add_argument("--output-dir", required=True,
                        help="results.jsonl, summary.json, table.txt, accuracy.png (reuse it to resume)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items of each benchmark (a trial run)")
    parser.add_argument("--synthetic-num", type=int, default=64, help="problems in the generated synthetic set")
    parser.add_argument("--synthetic-seed", type=int, default=0)
    policy = parser.add_argument_group("policy (one of --model-path, --policy-url)")
    policy.add_argument("--model-path", help="local model folder, export, or run folder (its newest checkpoint is "
                                             "exported first); generated with the HF engine of actors/")
    policy.add_argument("--device", default="cpu", help="torch device for --model-path (cpu, cuda, cuda:1)")
    policy.add_argument("--policy-url", help="OpenAI-compatible multimodal endpoint, e.g. http://host:8000/v1")
    policy.add_argument("--policy-model", help="model name at --policy-url")
    policy.add_argument("--policy-key-env", help="environment variable holding the policy endpoint's API key (omit: no key)")
    policy.add_argument("--max-tokens", type=int, default=4096, help="new tokens per response (greedy decoding)")
    policy.add_argument("--batch-size", type=int, default=64, help="prompts per generation call (and per resume checkpoint)")
    judge = parser.add_argument_group("answer judge (omit --judge-url: math-verify only)")
    judge.add_argument("--judge-url", help="OpenAI-compatible text endpoint for answer extraction and the true/false judgement")
    judge.add_argument("--judge-model", help="model name at --judge-url (the reference: Qwen2.5-72B-Instruct)")
    judge.add_argument("--judge-key-env", help="environment variable holding the judge's API key (omit: no key)")
    judge.add_argument("--judge-max-tokens", type=int, default=128,
                       help="reply tokens for extraction and judgement (reference: 128)")
    judge.add_argument("--mathverify-mode", choices=["reference", "fixed"], default="reference",
                       help="math-verify as the reference's reward (raw ground truth) or with its bugs treated (docs/method.md §3.6)")
    seen = parser.add_argument_group("perception labels (items with visual annotations)")
    seen.add_argument("--perception", choices=["auto", "llm", "lexical", "none"], default="auto",
                      help="llm: the training judge's prompt at --perception-url (default: --judge-url); lexical: the CPU "
                           "judge, no endpoint; auto: llm when a judge URL is given, else none")
    seen.add_argument("--perception-url", help="OpenAI-compatible endpoint of the perception judge (default: --judge-url)")
    seen.add_argument("--perception-model",
                      help="its model name (default: --judge-model; training used Qwen2.5-32B-Instruct-AWQ)")
    seen.add_argument("--perception-key-env", help="environment variable holding its API key (default: --judge-key-env)")
    seen.add_argument("--perception-max-tokens", type=int, default=512,
                      help="reply tokens for perception verdicts (training: 512)")
    seen.add_argument("--perception-prompt-file",
                      help="the judge's system message from a file, as training's judge.prompt_file (default: ours)")
    calls = parser.add_argument_group("requests")
    calls.add_argument("--concurrency", type=int, default=16, help="requests in flight per endpoint")
    calls.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    calls.add_argument("--max-attempts", type=int, default=4, help="tries per request (timeouts, 5xx, 429, connection errors)")
    track = parser.add_argument_group("tracking")
    track.add_argument("--mlflow", action="store_true", help="log the summary, table and chart to mlflow")
    track.add_argument("--mlflow-uri",
                       help=f"tracking URI (implies --mlflow; default: MLFLOW_TRACKING_URI, else {DEFAULT_MLFLOW_URI})")
    track.add_argument("--experiment", default="perception-r1-eval", help="mlflow experiment")
    track.add_argument("--run-name", help="mlflow run name (default: the output folder's name)")
    track.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    benchmarks = _validate(args)
    import asyncio

    from core.openai_calls import FatalEndpointError, RequestFailed
    from core.progress_log import check_manifest
    from perception_r1.forced_exit import forced_exit_after_sigint

    if args.model_path and (Path(args.model_path) / "checkpoints").is_dir():
        args.model_path = str(_export_run(Path(args.model_path)))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    check_manifest(output_dir, key="eval", value=_settings(args))
    items = _load(benchmarks, args)
    responder = _responder(args)
    stopped = f"\ninterrupted: finished items are saved in {output_dir}; rerun the same command to resume"
    try:
        with forced_exit_after_sigint(stopped):
            rows, stats = asyncio.run(_evaluate(items, responder, args, output_dir / "results.jsonl"))
    except (FatalEndpointError, RequestFailed) as e:
        print(f"perception-r1 eval: {e}\nfinished items are saved in {output_dir}; rerun the same command to resume",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(stopped, file=sys.stderr)
        return 130
    _report(rows, args, output_dir, stats)
    return 0


# ----------------------------------------------------------------------------------- validation
def _validate(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """The (name, path) benchmarks, after checking every argument; ValueError names the fix."""
    if (args.model_path is None) == (args.policy_url is None):
        raise ValueError("give exactly one policy: --model-path (a local model folder) or --policy-url with --policy-model")
    if args.policy_url and not args.policy_model:
        raise ValueError("--policy-url needs --policy-model (the model name at that endpoint)")
    if args.model_path and not Path(args.model_path).is_dir():
        raise ValueError(f"--model-path {args.model_path} is not a folder; give a model folder "
                         "(or build the tiny one with `perception-r1 build-tiny-model`)")
    if bool(args.judge_url) != bool(args.judge_model):
        raise ValueError("--judge-url and --judge-model go together (omit both to score with math-verify only)")
    _resolve_perception(args)
    for flag in ("policy_key_env", "judge_key_env", "perception_key_env"):
        name = getattr(args, flag)
        if name and not os.environ.get(name):
            raise ValueError(f"environment variable {name} (--{flag.replace('_', '-')}) is empty; export the key there")
    for flag in ("max_tokens", "batch_size", "concurrency", "max_attempts", "synthetic_num", "judge_max_tokens",
                 "perception_max_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1 (got {args.limit})")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 (got {args.timeout})")
    return [_benchmark_spec(spec) for spec in args.benchmark]


def _benchmark_spec(spec: str) -> tuple[str, str | None]:
    name, sep, path = spec.partition("=")
    if name not in BENCHMARK_NAMES:
        raise ValueError(f"--benchmark {spec!r}: unknown benchmark {name!r}; use one of {', '.join(BENCHMARK_NAMES)}")
    if not sep:
        if name != "synthetic":
            raise ValueError(f"--benchmark {spec!r}: give the local file or folder, e.g. --benchmark {name}=data/{name}")
        return name, None
    if not Path(path).exists():
        raise ValueError(f"--benchmark {spec!r}: {path} does not exist; download the benchmark or fix the path")
    return name, path


def _settings(args: argparse.Namespace) -> dict:
    """What makes results comparable: a folder is only resumed with the same settings."""
    import hashlib

    from core.config import FORMAT_PROMPT

    return {"policy": args.policy_model or str(Path(args.model_path).resolve()), "max_tokens": args.max_tokens,
            "judge_model": args.judge_model, "mathverify_mode": args.mathverify_mode, "perception": args.perception,
            "perception_model": args.perception_model, "format_prompt": FORMAT_PROMPT,
            **({"perception_prompt_sha1": hashlib.sha1(args.perception_prompt.encode()).hexdigest()}
               if args.perception_prompt_file else {})}


def _resolve_perception(args: argparse.Namespace) -> None:
    """Fill the perception judge's defaults from the answer judge's; `auto` becomes llm or none."""
    from judge.prompt_file import load_system_prompt

    args.perception_url = args.perception_url or args.judge_url
    args.perception_model = args.perception_model or args.judge_model
    args.perception_key_env = args.perception_key_env or args.judge_key_env
    if args.perception == "auto":
        args.perception = "llm" if args.perception_url else "none"
    if args.perception == "llm" and not (args.perception_url and args.perception_model):
        raise ValueError("--perception llm needs a judge endpoint: --perception-url and --perception-model "
                         "(or --judge-url and --judge-model); or use --perception lexical / none")
    if args.perception != "llm":
        args.perception_model = None
    args.perception_prompt = load_system_prompt(args.perception_prompt_file, field="--perception-prompt-file")


# -------------------------------------------------------------------------------------- building
def _load(benchmarks: list[tuple[str, str | None]], args: argparse.Namespace) -> list:
    from evaluation.benchmarks import check_unique_ids
    from perception_r1.eval_sets import load_benchmark

    items = []
    for name, path in benchmarks:
        loaded = load_benchmark(name, path, num_synthetic=args.synthetic_num, synthetic_seed=args.synthetic_seed)
        items.extend(loaded[: args.limit])
    check_unique_ids(items)
    return items


def _export_run(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run folder as a model folder, exported once into RUN_DIR/export/."""
    from perception_r1.export import export, find_checkpoint, step_of

    out = run_dir / "export" / f"step_{step_of(find_checkpoint(run_dir, step=None)):06d}"
    if not out.is_dir():  # an export is renamed into place only when whole
        export(run_dir, out)
        print(f"exported {run_dir}'s newest checkpoint to {out}")
    return out


def _endpoint(url: str, model: str, key_env: str | None, *, max_tokens: int, args: argparse.Namespace):
    from core.openai_calls import Endpoint

    return Endpoint(base_url=url, model=model, key_env=key_env, temperature=0.0, max_tokens=max_tokens,
                    timeout_s=args.timeout, max_attempts=args.max_attempts)


def _responder(args: argparse.Namespace):
    from evaluation.responders import EngineResponder, OpenAIResponder

    if args.model_path:  # greedy generation with the HF engine of actors/ on the model folder
        from actors.hf_engine import HFEngine
        from core.config import DataConfig

        engine = HFEngine(args.model_path, data=DataConfig(), num_threads=1, device=args.device)
        return EngineResponder(engine, max_tokens=args.max_tokens)
    endpoint = _endpoint(args.policy_url, args.policy_model, args.policy_key_env, max_tokens=args.max_tokens, args=args)
    return OpenAIResponder(endpoint, concurrency=args.concurrency)


async def _evaluate(items: list, responder, args: argparse.Namespace, results_path: Path):
    """Run the loop with the judge clients open; returns the rows and the judges' counters."""
    from core.openai_calls import ChatClient
    from evaluation.evaluate import evaluate
    from evaluation.perception import LexicalLabeller, LLMLabeller
    from evaluation.scoring import ReferenceScorer

    clients, scorer, labeller = [], None, None
    if args.judge_url:
        clients.append(ChatClient(_endpoint(args.judge_url, args.judge_model, args.judge_key_env,
                                            max_tokens=args.judge_max_tokens, args=args), concurrency=args.concurrency))
        scorer = ReferenceScorer(clients[-1])
    if args.perception == "llm":
        clients.append(ChatClient(_endpoint(args.perception_url, args.perception_model, args.perception_key_env,
                                            max_tokens=args.perception_max_tokens, args=args), concurrency=args.concurrency))
        labeller = LLMLabeller(clients[-1], system_prompt=args.perception_prompt)
    elif args.perception == "lexical":
        labeller = LexicalLabeller()
    try:
        rows = await evaluate(items, responder, results_path=results_path, scorer=scorer, labeller=labeller,
                              mathverify_mode=args.mathverify_mode, batch_size=args.batch_size,
                              show_progress=not args.no_progress)
    finally:
        for client in clients:
            await client.close()
    stats = {"unparseable_judgements": scorer.num_unparseable if scorer else 0,
             "unparseable_perception": labeller.num_unparseable if labeller else 0}
    return rows, stats


# ------------------------------------------------------------------------------------- reporting
def _report(rows: list, args: argparse.Namespace, output_dir: Path, stats: dict) -> None:
    from evaluation import report
    from perception_r1.tracking import use_experiment

    summaries = report.summarize(rows)
    model_name = args.policy_model or Path(args.model_path).name
    table = report.format_table(summaries, model_name=model_name)
    (output_dir / "table.txt").write_text(table + "\n", encoding="utf-8")
    artifacts = [output_dir / "table.txt", report.write_summary(summaries, output_dir / "summary.json"),
                 report.plot(summaries, output_dir / "accuracy.png", model_name=model_name)]
    print(table)
    if stats["unparseable_judgements"]:
        print(f"{stats['unparseable_judgements']} judge replies were neither true nor false this run (scored incorrect; "
              "see judge_reply in results.jsonl)")
    if stats["unparseable_perception"]:
        print(f"{stats['unparseable_perception']} perception judgements had no <infoK> tag this run (labelled null)")
    print(f"results: {output_dir / 'results.jsonl'}; chart: {output_dir / 'accuracy.png'}")
    if args.mlflow or args.mlflow_uri:
        uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI
        params = {k: str(v) for k, v in _settings(args).items() if k != "format_prompt"}
        use_experiment(uri, args.experiment)  # a new sqlite experiment keeps its artifacts beside the db
        run_id = report.log_mlflow(summaries, tracking_uri=uri, experiment=args.experiment,
                                   run_name=args.run_name or output_dir.name, params=params,
                                   artifacts=[*artifacts, output_dir / "results.jsonl"])
        print(f"mlflow: run {run_id} in experiment {args.experiment!r} at {uri}")
