"""The placement plan of a run: from the config alone, which parts ask Ray for which resources, as
bundles (a bundle is what must land on one node: a generation actor and its tensor-parallel GPUs, a
learner worker in Ray Train's placement group, a judge replica), and whether they fit the nodes.
Pure: no Ray, no torch. The driver asks Ray for exactly these (perception_r1/driver.py build_*,
judge/service.py); `perception-r1 train --dry-run` prints the plan, and start-up checks it against
the cluster's nodes before asking (perception_r1/preflight.py).

    part               bundles                            set by
    generation actor   num_actors x {GPU: num_gpus_per_actor}          rollout.*
    learner worker     num_workers x {CPU: cpus_per_worker, GPU: 0|1}  learner.* (Ray Train's group)
    judge LLM replica  num_replicas x {GPU: num_gpus_per_replica}      judge.llm.* (vllm only)

Every other actor of a run (buffer, reward replicas, queues) takes no CPU or GPU from Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import Config, VLLMJudgeConfig


@dataclass(frozen=True)
class Part:
    name: str
    count: int
    bundle: dict[str, float]
    """What each of the `count` instances asks for; it must fit on one node."""
    fields: str
    """The config fields that set it (named when the plan does not fit)."""
    placed_by: str
    """How the driver asks Ray for it."""


@dataclass(frozen=True)
class Plan:
    parts: tuple[Part, ...]

    def total(self) -> dict[str, float]:
        out = {"CPU": 0.0, "GPU": 0.0}
        for part in self.parts:
            for key, value in part.bundle.items():
                out[key] = out.get(key, 0.0) + part.count * value
        return out

    def lines(self) -> list[str]:
        rows = [f"  {p.name:<18} {p.count:>3} x {{{_bundle_text(p.bundle)}}}  {p.placed_by}; {p.fields}"
                for p in self.parts]
        return ["placement plan (bundles: each lands on one node):", *rows,
                f"  {'total':<18}       {{{_bundle_text(self.total())}}}"]


def plan(cfg: Config) -> Plan:
    r, lc, judge = cfg.rollout, cfg.learner, cfg.judge.llm
    parts = [
        Part("generation actor", r.num_actors, {"GPU": r.num_gpus_per_actor},
             "rollout.num_actors x rollout.num_gpus_per_actor", "an actor each"),
        Part("learner worker", lc.num_workers, {"CPU": lc.cpus_per_worker, "GPU": float(lc.num_gpus_per_worker)},
             "learner.num_workers x learner.cpus_per_worker, learner.num_gpus_per_worker",
             "Ray Train's placement group"),
    ]
    if isinstance(judge, VLLMJudgeConfig):
        parts.append(Part("judge LLM replica", judge.num_replicas, {"GPU": judge.num_gpus_per_replica},
                          "judge.llm.num_replicas x judge.llm.num_gpus_per_replica", "Serve replicas"))
    return Plan(tuple(parts))


def misfits(p: Plan, nodes: list[dict[str, float]]) -> list[str]:
    """Why the plan's bundles cannot all be placed on `nodes` (each a node's total CPU/GPU), first fit
    by decreasing GPUs; [] when they fit. Each reason names the fields to change."""
    free = [dict(n) for n in nodes]
    problems = []
    bundles = sorted(((part, i) for part in p.parts for i in range(part.count)),
                     key=lambda item: -item[0].bundle.get("GPU", 0.0))
    for part, i in bundles:
        node = next((n for n in free if _fits(part.bundle, n)), None)
        if node is None:
            problems.append(_misfit_text(p, part, i, nodes))
            break  # the rest would be reported against a plan already known not to fit
        for key, value in part.bundle.items():
            node[key] = node.get(key, 0.0) - value
    return problems


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(value <= node.get(key, 0.0) + 1e-9 for key, value in bundle.items() if value > 0)


def _misfit_text(p: Plan, part: Part, index: int, nodes: list[dict[str, float]]) -> str:
    shape = ", ".join(f"{{{_bundle_text(n)}}}" for n in nodes)
    if not any(_fits(part.bundle, n) for n in nodes):
        return (f"a {part.name} asks for {{{_bundle_text(part.bundle)}}} on one node, more than any node has ({shape}); "
                f"lower {part.fields}")
    parts = "; ".join(f"{q.name}s {q.count} x {{{_bundle_text(q.bundle)}}} ({q.fields})" for q in p.parts)
    return (f"{part.name} {index + 1} of {part.count} finds no node with room: the plan asks for "
            f"{{{_bundle_text(p.total())}}} in all and the nodes have {shape}; lower one of: {parts}")


def _bundle_text(bundle: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in bundle.items())
