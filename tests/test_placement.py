"""The placement plan (perception_r1/placement.py): what each part of a run asks Ray for, and whether
it fits the nodes; a plan that does not fit is refused naming the fields to change."""

from pathlib import Path

import pytest

from core.config_files import load_config
from perception_r1 import placement, preflight

REPO = Path(__file__).resolve().parents[1]
ONE_NODE = REPO / "configs" / "qwen2_5_vl_7b_geo3k_1node.yaml"
NODE = {"CPU": 16.0, "GPU": 8.0}


def test_the_one_node_layout_fills_the_eight_gpus():
    plan = placement.plan(load_config(ONE_NODE))
    parts = {p.name: (p.count, p.bundle) for p in plan.parts}
    assert parts == {"generation actor": (3, {"GPU": 1.0}), "learner worker": (4, {"CPU": 1.0, "GPU": 1.0}),
                     "judge LLM replica": (1, {"GPU": 1.0})}
    assert plan.total() == {"CPU": 4.0, "GPU": 8.0}
    assert placement.misfits(plan, [NODE]) == []
    preflight.check_placement(load_config(ONE_NODE), [NODE])


def test_an_oversubscribed_node_is_refused_naming_the_fields():
    cfg = load_config(ONE_NODE, ["rollout.num_actors=4", "cluster.num_gpus=null"])  # the schema's own sum check off
    problems = placement.misfits(placement.plan(cfg), [NODE])
    assert len(problems) == 1
    for field in ("rollout.num_actors x rollout.num_gpus_per_actor", "learner.num_workers", "judge.llm.num_replicas",
                  "{CPU 4, GPU 9} in all", "{CPU 16, GPU 8}"):
        assert field in problems[0], problems[0]
    with pytest.raises(ValueError, match="finds no node with room"):
        preflight.check_placement(cfg, [NODE])


def test_a_bundle_larger_than_any_node_is_named():
    cfg = load_config(ONE_NODE, ["rollout.engine.tensor_parallel_size=2", "rollout.num_gpus_per_actor=2",
                                 "rollout.num_actors=1", "cluster.num_gpus=null"])
    assert placement.misfits(placement.plan(cfg), [NODE]) == []
    two_small_nodes = [{"CPU": 8.0, "GPU": 1.0}] * 8  # 8 GPUs in all, but a 2-GPU actor fits none of them
    problems = placement.misfits(placement.plan(cfg), two_small_nodes)
    assert "a generation actor asks for {GPU 2} on one node, more than any node has" in problems[0]
    assert "lower rollout.num_actors x rollout.num_gpus_per_actor" in problems[0]


def test_cpu_parts_fit_a_cpu_node():
    cfg = load_config(REPO / "configs" / "demo-cpu.yaml")
    plan = placement.plan(cfg)
    assert plan.total() == {"CPU": 1.0, "GPU": 0.0}
    assert placement.misfits(plan, [{"CPU": 2.0}]) == []
    problems = placement.misfits(plan, [{"CPU": 0.5}])
    assert "a learner worker asks for {CPU 1, GPU 0} on one node, more than any node has ({CPU 0.5})" in problems[0]
