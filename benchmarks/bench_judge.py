"""The judge LLM as the system deploys it (`judge.service.start_judge`: Ray Serve, vLLM's async engine),
measured through the project's own judge client: verdicts/s, per-verdict latency, fallbacks, engine
start, and from them the judge's share of one step of the reference recipe.

    python3 -m benchmarks.bench_judge /tmp/pr1-assets --shapes judge7b judge32b_awq --verdicts 1024
    python3 -m benchmarks.bench_judge /tmp/pr1-assets --llm lexical --verdicts 64   # CPU: same path, lexical judge

Per judge shape: a text-only model folder without weights (`benchmarks.assets.write_judge_dir`, vLLM
`load_format="dummy"`), `start_judge` with the recipe's judge settings (JudgeConfig's defaults: temperature
0, 512 tokens, retries, concurrency) except a longer per-request timeout, so that the benchmark measures
instead of falling back; a warm-up batch, then `--verdicts` judgements submitted at once (the client's
`max_concurrency` applies). Random weights never emit EOS: every verdict runs to `max_tokens` and none
parses, so the figures are a worst case and `unparseable` is expected. The recipe judges every rollout of a
step (prompts_per_step x samples_per_prompt verdicts), so judge_seconds_per_step_per_gpu = verdicts_per_step
x judge GPUs / verdicts_per_s; with `--step-generation-s`, judge_gpus_needed is how many judge GPUs keep
scoring (overlapping generation) from ever holding a step. A shape whose engine fails is a row with its error.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import subprocess
import time
from pathlib import Path

from benchmarks.common import RESULTS, print_table, write_result

RECIPE = "configs/qwen2_5_vl_7b_geo3k.yaml"
NOTE = ("random (dummy) weights never emit EOS: every verdict runs to max_tokens and none parses (unparseable "
        "is expected); the byte-level tokenizer makes prompts ~4x longer in tokens than Qwen's: a worst case")
ROW_KEYS = ("shape", "judge_gpus", "engine_start_s", "verdicts", "wall_s", "judge_verdicts_per_s", "judge_p50_s",
            "judge_p99_s", "fallbacks", "unparseable", "output_tokens_per_s_est", "judge_seconds_per_step_per_gpu",
            "judge_gpus_needed", "error")
LETTERS = "ABCDEFGHKLMNOPQRST"


# ------------------------------------------------------------------------------------------- data
def _fact(rng: random.Random) -> str:
    a, b, c, d = rng.sample(LETTERS, 4)
    n, deg = rng.randint(2, 30), rng.choice(range(15, 166, 5))
    return rng.choice([f"{a}{b} = {n}", f"Angle {a}{b}{c} measures {deg}°.", f"{a}{b} is parallel to {c}{d}.",
                       f"{a}{b} is perpendicular to {b}{c}.", f"Triangle {a}{b}{c} is isosceles with {a}{b} = {a}{c}.",
                       f"O is the center of the circle and its radius is {n}.", f"{a}{b}{c}{d} is a rectangle.",
                       f"{d} is the midpoint of {a}{b}.", f"The area of triangle {a}{b}{c} is {n * 3}."])


def _response(rng: random.Random, facts: tuple[str, ...], index: int) -> str:
    """A few hundred characters of reasoning restating some facts (some with a wrong number), then an answer."""
    said = [f if rng.random() < 0.7 else re.sub(r"\d+", "99", f, count=1) for f in facts if rng.random() < 0.8]
    steps = ["Using the Pythagorean theorem on the right triangle gives the missing side.",
             "The angles of a triangle sum to 180°, so the remaining angle follows.",
             "Alternate interior angles between parallel lines are equal.",
             "Multiplying the base by the height and halving gives the area."]
    stated = " ".join(f if f.endswith(".") else f"{f}." for f in said) or "the figure is drawn to scale."
    think = (f"(case {index}) From the diagram, {stated} "
             + " ".join(rng.sample(steps, 3)) + f" Therefore x = {rng.randint(2, 200)}.")
    return f"<think>\n{think}\n</think>\n<answer>\n\\boxed{{{rng.randint(2, 200)}}}\n</answer>"


def judge_inputs(num: int, *, offset: int = 0, seed: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    """`num` distinct (response, annotations) pairs with 3-6 geometry annotations each, deterministic."""
    out = []
    for i in range(offset, offset + num):
        rng = random.Random(f"bench-judge-{seed}-{i}")
        facts = tuple(_fact(rng) for _ in range(rng.randint(3, 6)))
        out.append((_response(rng, facts, i), facts))
    return out


def recipe_verdicts_per_step(path: str) -> int:
    """Verdicts one step of the recipe asks for: every rollout of the step is judged."""
    from core.config_files import load_config

    cfg = load_config(path)
    return cfg.learner.prompts_per_step * cfg.rollout.samples_per_prompt


# ------------------------------------------------------------------------------------------ judge
def judge_config(args: argparse.Namespace, shape: str):
    """The recipe's judge settings (JudgeConfig defaults) with this shape's LLM and a longer timeout."""
    from core.config import JudgeConfig, LexicalJudgeConfig, VLLMJudgeConfig

    if args.llm == "lexical":
        llm = LexicalJudgeConfig()
    else:
        llm = VLLMJudgeConfig(model_path=str(judge_dir(args.assets, shape)), load_format="dummy",
                              gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                              enforce_eager=args.eager)
    return JudgeConfig(llm=llm, timeout_s=args.timeout_s, http_port=args.http_port)


def judge_dir(assets: Path, shape: str) -> Path:
    from benchmarks.assets import JUDGE_SHAPES, write_judge_dir

    path = (assets / shape).resolve()
    if not (path / "config.json").exists():
        write_judge_dir(path, JUDGE_SHAPES[shape])
    return path


def judge_gpus(cfg) -> int:
    from core.config import VLLMJudgeConfig

    llm = cfg.llm
    return llm.num_replicas * llm.tensor_parallel_size if isinstance(llm, VLLMJudgeConfig) else 0


def client_for(service, cfg):
    """The judge client as the reward replicas build it (judge/app.py RewardServer), at the judge-llm app."""
    from core.config import VLLMJudgeConfig
    from judge.app import LEXICAL_MODEL
    from judge.client import JudgeClient, JudgeEndpoint
    from judge.prompt_file import load_system_prompt
    from judge.service import JUDGE_LLM_APP, REWARD_APP

    base = service.url.removesuffix(f"/{REWARD_APP}/score")
    model = cfg.llm.model_path if isinstance(cfg.llm, VLLMJudgeConfig) else LEXICAL_MODEL
    return JudgeClient(cfg, JudgeEndpoint(f"{base}/{JUDGE_LLM_APP}/v1", model), backoff_s=cfg.retry_backoff_s,
                       backoff_max_s=cfg.retry_backoff_max_s, system_prompt=load_system_prompt(cfg.prompt_file))


# ------------------------------------------------------------------------------------ measurement
async def _timed(client, response: str, annotations: tuple[str, ...]):
    started = time.perf_counter()
    judgement = await client.judge(response, annotations)
    return judgement, time.perf_counter() - started


async def drive(client, *, warmup: int, verdicts: int, deadline_s: float) -> dict:
    """A warm-up batch, then `verdicts` judgements at once: wall time, latencies, failures by kind."""
    import numpy as np

    try:
        await asyncio.wait_for(asyncio.gather(*[client.judge(r, a) for r, a in judge_inputs(warmup, seed=1)]),
                               deadline_s)
        started = time.perf_counter()
        out = await asyncio.wait_for(asyncio.gather(*[_timed(client, r, a) for r, a in judge_inputs(verdicts)]),
                                     deadline_s)
        wall = time.perf_counter() - started
    finally:
        await client.close()
    latency = np.asarray([s for _, s in out])
    errors = [j.error for j, _ in out if j.failed]
    return {"verdicts": len(out), "wall_s": wall, "judge_verdicts_per_s": len(out) / wall,
            "judge_p50_s": float(np.percentile(latency, 50)), "judge_p99_s": float(np.percentile(latency, 99)),
            "fallbacks": sum(e != "unparseable" for e in errors), "unparseable": errors.count("unparseable")}


def step_share(row: dict, *, verdicts_per_step: int, step_generation_s: float | None) -> dict:
    """The judge's seconds per recipe step on one judge GPU, and the judge GPUs that keep up with generation."""
    per_gpu = verdicts_per_step * max(row["judge_gpus"], 1) / row["judge_verdicts_per_s"]
    needed = math.ceil(per_gpu / step_generation_s) if step_generation_s else None
    return {"judge_seconds_per_step_per_gpu": per_gpu, "judge_gpus_needed": needed}


def bench_shape(args: argparse.Namespace, shape: str, *, verdicts_per_step: int) -> dict:
    """One judge shape start to stop; an error anywhere becomes the row's `error` (the run goes on)."""
    row = dict.fromkeys(ROW_KEYS) | {"shape": shape}
    service = None
    try:
        cfg = judge_config(args, shape)
        row["judge_gpus"] = judge_gpus(cfg)
        started = time.perf_counter()
        from judge.service import start_judge

        service = start_judge(cfg, deadline_s=args.start_deadline_s)
        row["engine_start_s"] = time.perf_counter() - started
        row |= asyncio.run(drive(client_for(service, cfg), warmup=args.warmup, verdicts=args.verdicts,
                                 deadline_s=args.batch_deadline_s))
        if args.llm == "vllm":
            row["output_tokens_per_s_est"] = row["judge_verdicts_per_s"] * cfg.max_tokens
        row |= step_share(row, verdicts_per_step=verdicts_per_step, step_generation_s=args.step_generation_s)
    except Exception as e:  # noqa: BLE001 -- a shape that fails is reported, the next one still runs
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
    finally:
        stop_judge(service)
    return row


def stop_judge(service) -> None:
    """The judge's apps and Serve down, then GPU memory back (the next shape's engine needs it)."""
    from ray import serve

    if service is not None:
        try:
            service.stop()
        except Exception as e:  # noqa: BLE001 -- serve.shutdown below removes what is left
            print(f"judge stop failed: {type(e).__name__}: {e}")
    serve.shutdown()
    wait_gpu_memory_free(deadline_s=120.0)


def wait_gpu_memory_free(*, deadline_s: float, used_mib: int = 2048) -> None:
    """Until every GPU uses under `used_mib` (nvidia-smi; no CUDA context in this process), or the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return  # no GPU here
        if all(int(v) < used_mib for v in out.split()):
            return
        time.sleep(2.0)
    print(f"GPU memory still in use after {deadline_s:.0f}s")


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.assets import JUDGE_SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("assets", type=Path, help="folder of the judge model folders (written if absent)")
    parser.add_argument("--shapes", nargs="+", default=list(JUDGE_SHAPES), choices=list(JUDGE_SHAPES))
    parser.add_argument("--llm", default="vllm", choices=["vllm", "lexical"], help="lexical: the CPU judge, same path")
    parser.add_argument("--verdicts", type=int, default=1024, help="judgements submitted at once")
    parser.add_argument("--warmup", type=int, default=16, help="judgements before the measured batch")
    parser.add_argument("--step-generation-s", type=float, default=None,
                        help="seconds one step's generation takes (measured elsewhere): prints judge_gpus_needed")
    parser.add_argument("--recipe", default=RECIPE, help="the config whose step shape the judge share is for")
    parser.add_argument("--eager", action="store_true", help="vLLM enforce_eager (no CUDA graphs)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--timeout-s", type=float, default=600.0,
                        help="judge.timeout_s (the recipe's 60 s would turn queueing into fallbacks)")
    parser.add_argument("--start-deadline-s", type=float, default=600.0)
    parser.add_argument("--batch-deadline-s", type=float, default=900.0)
    parser.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy (when this starts Serve)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    import ray

    from core.config import JudgeConfig

    verdicts_per_step = recipe_verdicts_per_step(args.recipe)
    defaults = JudgeConfig()
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {
        "verdicts_per_step": verdicts_per_step, "temperature": defaults.temperature, "max_tokens": defaults.max_tokens,
        "max_retries": defaults.max_retries, "max_concurrency": defaults.max_concurrency, "note": NOTE,
        "timeout_note": f"judge.timeout_s {args.timeout_s:g} (recipe {defaults.timeout_s:g}) so that it measures"}
    print(f"judge.timeout_s={args.timeout_s:g} (the recipe's is {defaults.timeout_s:g}): queueing is measured, not "
          f"turned into fallbacks. {verdicts_per_step} verdicts per step ({args.recipe}).")
    if args.llm == "vllm":
        print(f"note: {NOTE}")
    started_ray = not ray.is_initialized()
    if started_ray:
        os.environ.setdefault("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")  # a failing engine fails once, not 3x
        ray.init(include_dashboard=False)
    name, rows = f"judge_{args.llm}_serve", []
    try:
        for shape in args.shapes if args.llm == "vllm" else ["lexical"]:
            rows.append(bench_shape(args, shape, verdicts_per_step=verdicts_per_step))
            path = write_result(name, config=config, metrics={r["shape"]: r for r in rows}, out_dir=args.out)
            print(f"wrote {path}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in rows[-1].items() if v is not None))  # run_gpu.sh's grep
    finally:
        if started_ray:
            ray.shutdown()
    print_table(f"{name}: {args.verdicts} verdicts at once, {verdicts_per_step} per recipe step", rows)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
