"""Reward benchmark: how fast the rule rewards score on CPU, what the judge app adds per request, and
(on a GPU machine) how many verdicts per second a vLLM judge deployment gives.

    python -m benchmarks.bench_rewards                    # CPU -> benchmarks/results/rewards-cpu.json
    python -m benchmarks.bench_rewards --vllm-model PATH  # GPU -> benchmarks/results/rewards-vllm.json

CPU part:
- rules: format + repetition in-process, accuracy (math-verify) in-process, and accuracy through the
  verifier pool (2 worker processes, the app's setting), on distinct responses built from synthetic
  geometry solutions (right, wrong, unformatted, looping).
- app overhead: one group of 8 rollouts scored sequentially (a) in-process by `GroupScorer`, (b) through
  the Serve handle, (c) over HTTP (msgpack), against a fake judge on loopback that answers at once
  (a threaded stdlib server); overhead = (b) - (a) and (c) - (a) at the median. Both with annotations
  (8 judge calls per group) and without (rules only). Then groups/s with 32 groups in flight (handle).
vLLM part: `start_judge` with a `vllm` judge, then `--num-requests` judgements with `--concurrency` in
flight through the judge client (temperature 0, 512 tokens max); verdicts/s and how many parsed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_result
from core.ports import free_port

F = "<think>\n{t}\n</think>\n<answer>\n{a}\n</answer>"


# ------------------------------------------------------------------------------------------- data
@functools.cache
def responses(num: int) -> list[tuple[str, str, tuple[str, ...]]]:
    """(response, ground truth, annotations), all responses distinct: four kinds per synthetic problem."""
    from core.config import SyntheticDataConfig
    from dataprep.synthetic import make_problems

    problems = make_problems(SyntheticDataConfig(num_problems=max(1, num // 4)))
    out = []
    for i in range(num):
        p = problems[(i // 4) % len(problems)]
        kind, tag = i % 4, f"(case {i})"
        text = [p.solution.replace("</think>", f"{tag}\n</think>"),
                F.format(t=f"{tag} I guess.", a=rf"\boxed{{{int(p.answer) + 1}}}"),
                f"{tag} the answer is {p.answer}",
                F.format(t=f"{tag} " + "so we get " * 60, a=rf"\boxed{{{p.answer}}}")][kind]
        out.append((text, p.answer, p.annotations))
    return out


def group_of(i: int, n: int, *, annotated: bool):
    from core.records import Prompt, Rollout, RolloutGroup

    texts = [f"{t} #{i}" for t, _, _ in responses(n)]  # distinct per group: no judge-cache hits
    rollouts = tuple(Rollout(np.zeros(8, np.int32), np.zeros(8, np.float32), t, "stop", 0, 0) for t in texts)
    items = ("AB = 7", "BC = 7", "AC = 10") if annotated else ()
    return RolloutGroup(Prompt(f"g{i}", i, "q <image>", "24", b"", items), np.zeros(4, np.int32), rollouts, 0, 0.0)


# ------------------------------------------------------------------------------------------ rules
def bench_rules(num: int) -> dict[str, float]:
    from judge.rules import accuracy_reward, format_reward, repetition_penalty
    from judge.verifier import VerifierPool

    data = responses(num)
    started = time.perf_counter()
    for text, _, _ in data:
        format_reward(text), repetition_penalty(text)
    cheap = num / (time.perf_counter() - started)
    started = time.perf_counter()
    for text, gt, _ in data:
        accuracy_reward(text, gt, mode="reference")
    in_process = num / (time.perf_counter() - started)

    async def pooled() -> float:
        pool = VerifierPool(num_workers=2, timeout_s=10.0)
        await pool.start()
        t0 = time.perf_counter()
        await asyncio.gather(*[pool.accuracy(f"{t} ", gt, mode="reference") for t, gt, _ in data])
        rate = num / (time.perf_counter() - t0)
        await pool.close()
        return rate

    return {"format_and_repetition_per_s": cheap, "accuracy_in_process_per_s": in_process,
            "accuracy_pool2_per_s": asyncio.run(pooled())}


# ------------------------------------------------------------------------------------ app overhead
def _instant_judge():
    """A threaded stdlib server answering every chat request at once with all items 1."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "instant", "choices": [
        {"index": 0, "finish_reason": "stop",
         "message": {"role": "assistant", "content": "<info1>1</info1>\n<info2>1</info2>\n<info3>1</info3>"}}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # else headers and body wait on delayed ACKs (~40 ms a reply)

        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads, request_queue_size = True, 1024

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def bench_app(*, repeats: int, n: int) -> tuple[dict[str, float], dict]:
    import ray
    import requests

    from core import codec
    from core.config import ExternalJudgeConfig, JudgeConfig
    from judge.client import JudgeClient, JudgeEndpoint
    from judge.scoring import GroupScorer
    from judge.service import start_judge
    from judge.verifier import VerifierPool

    server, url = _instant_judge()
    cfg = JudgeConfig(llm=ExternalJudgeConfig(base_url=url, model="instant"), http_port=free_port("127.0.0.1"),
                      timeout_s=10.0)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    svc = start_judge(cfg)
    loop = asyncio.new_event_loop()
    scorer = GroupScorer(cfg, verifier=VerifierPool(num_workers=2), judge=JudgeClient(cfg, JudgeEndpoint(url, "instant")))
    metrics: dict[str, float] = {}
    try:
        for annotated in (True, False):
            label, base = ("judged" if annotated else "rules_only"), 10_000 * (1 + annotated)
            groups = [group_of(base + i, n, annotated=annotated) for i in range(3 * repeats + 3)]
            loop.run_until_complete(scorer.score(groups[-1]))  # warm-ups
            loop.run_until_complete(svc.score(groups[-2]))
            requests.post(svc.url, data=codec.encode(groups[-3]), timeout=60)
            direct = _timed(lambda i: loop.run_until_complete(scorer.score(groups[i])), repeats)
            handle = _timed(lambda i: loop.run_until_complete(svc.score(groups[repeats + i])), repeats)
            http = _timed(lambda i: requests.post(svc.url, data=codec.encode(groups[2 * repeats + i]), timeout=60)
                          .raise_for_status(), repeats)
            metrics.update({f"{label}_group_in_process_p50_ms": 1e3 * statistics.median(direct),
                            f"{label}_group_handle_p50_ms": 1e3 * statistics.median(handle),
                            f"{label}_group_http_p50_ms": 1e3 * statistics.median(http),
                            f"{label}_handle_overhead_ms": 1e3 * (statistics.median(handle) - statistics.median(direct)),
                            f"{label}_http_overhead_ms": 1e3 * (statistics.median(http) - statistics.median(direct))})
        metrics["judged_groups_per_s_32_in_flight"] = _throughput(svc, loop, n=n, num_groups=128, in_flight=32)
    finally:
        loop.run_until_complete(scorer.close())
        svc.stop()
        ray.shutdown()
        server.shutdown()
    return metrics, {"rollouts_per_group": n, "repeats": repeats, "judge": "instant loopback fake (stdlib threads)"}


def _throughput(svc, loop, *, n: int, num_groups: int, in_flight: int) -> float:
    groups = [group_of(50_000 + i, n, annotated=True) for i in range(num_groups)]
    gate = asyncio.Semaphore(in_flight)

    async def one(g):
        async with gate:
            await svc.score(g)

    async def run() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*[one(g) for g in groups])
        return num_groups / (time.perf_counter() - t0)

    return loop.run_until_complete(run())


# ------------------------------------------------------------------------------------------- vLLM
def bench_vllm(args: argparse.Namespace) -> tuple[dict[str, float], dict]:
    import ray

    from core.config import JudgeConfig, VLLMJudgeConfig
    from judge.client import JudgeClient, JudgeEndpoint
    from judge.service import start_judge

    llm = VLLMJudgeConfig(model_path=str(Path(args.vllm_model).resolve()), load_format=args.load_format,
                    gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len)
    cfg = JudgeConfig(llm=llm, http_port=free_port("127.0.0.1"), timeout_s=600.0, max_concurrency=args.concurrency,
                      cache_size=0)
    ray.init(include_dashboard=False, log_to_driver=True)
    started = time.perf_counter()
    svc = start_judge(cfg)
    startup = time.perf_counter() - started
    client = JudgeClient(cfg, JudgeEndpoint(f"http://127.0.0.1:{cfg.http_port}/judge-llm/v1", llm.model_path))
    data = responses(args.num_requests)

    async def run():
        t0 = time.perf_counter()
        out = await asyncio.gather(*[client.judge(t, items) for t, _, items in data])
        wall = time.perf_counter() - t0
        await client.close()
        return out, wall

    try:
        judgements, wall = asyncio.run(run())
    finally:
        svc.stop()
        ray.shutdown()
    stats = client.stats()
    metrics = {"verdicts_per_s": len(judgements) / wall, "wall_s": wall, "startup_s": startup,
               "parsed_frac": sum(not j.failed for j in judgements) / len(judgements),
               "failed": float(stats.num_timeouts + stats.num_errors),
               "latency_p50_s": stats.latency_p50_s, "latency_p99_s": stats.latency_p99_s}
    return metrics, {"model": llm.model_path, "load_format": args.load_format, "num_requests": args.num_requests,
                     "concurrency": args.concurrency, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-responses", type=int, default=2000, help="responses for the rule benchmark")
    parser.add_argument("--repeats", type=int, default=30, help="sequential groups per app-overhead measurement")
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per group")
    parser.add_argument("--vllm-model", help="benchmark a vLLM judge deployment of this local model instead")
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy", "safetensors"])
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]  # the CPU figures depend on what else runs on the machine
    if args.vllm_model:
        metrics, config = bench_vllm(args)
        name = "rewards-vllm"
    else:
        rules = bench_rules(args.num_responses)
        app, config = bench_app(repeats=args.repeats, n=args.rollouts)
        metrics, name = {**rules, **app}, "rewards-cpu"
        config = {**config, "num_responses": args.num_responses, "verifier_workers": 2,
                  "load_avg_1m_at_start": load_at_start}
    print_table(f"{name} ({config})", [{"metric": k, "value": v} for k, v in metrics.items()])
    print(f"wrote {write_result(name, config=config, metrics=metrics, out_dir=args.out_dir)}")


if __name__ == "__main__":
    main()
