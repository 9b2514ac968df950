"""`perception-r1 train CONFIG --dry-run` prints the placement plan and the learner's memory estimate,
starts nothing (no Ray, no torch imported), exits 0 when the run fits and 2 listing the problems."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURE_7B = "tests/fixtures/qwen2_5_vl_7b"
ONE_NODE = "configs/qwen2_5_vl_7b_geo3k_1node.yaml"
RUN = """
import sys
from perception_r1.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "ray", "transformers", "vllm") if m in sys.modules)
print("heavy modules:", heavy)
sys.exit(rc)
"""


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN, "train", *args, "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_the_one_node_recipe_fits_and_nothing_heavy_is_imported():
    out = dry_run(ONE_NODE, "--set", f"model.path={FIXTURE_7B}")
    assert out.returncode == 0, out.stdout + out.stderr
    for text in ("placement plan", "generation actor     3 x {GPU 1}", "learner worker       4 x {CPU 1, GPU 1}",
                 "judge LLM replica    1 x {GPU 1}", "{CPU 4, GPU 8}", "8.29 B parameters", "of 80 GiB per GPU: fits",
                 "nothing was started", "heavy modules: []"):
        assert text in out.stdout, out.stdout


def test_a_learner_that_does_not_fit_exits_2_listing_the_fix():
    out = dry_run(ONE_NODE, "--set", f"model.path={FIXTURE_7B}", "--set", "learner.max_tokens_per_micro_batch=131072")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "DOES NOT FIT" in out.stdout and "problems:" in out.stdout
    assert "lower learner.max_tokens_per_micro_batch" in out.stdout


def test_an_oversubscribed_node_exits_2_naming_the_fields():
    out = dry_run(ONE_NODE, "--set", f"model.path={FIXTURE_7B}", "--set", "rollout.num_actors=4")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "asks for 9 GPUs (rollout.num_actors x rollout.num_gpus_per_actor = 4x1" in out.stderr
    assert "judge.llm.num_replicas x judge.llm.num_gpus_per_replica = 1x1" in out.stderr


def test_a_missing_model_folder_is_named_with_what_to_pass():
    out = dry_run(ONE_NODE)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "models/Qwen2.5-VL-7B-Instruct has no config.json" in out.stdout and "--set model.path=" in out.stdout
    assert "placement plan" in out.stdout  # the plan is still printed
