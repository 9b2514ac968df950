"""benchmarks/bench_judge.py on CPU: the lexical judge through the same path as the vLLM one (Serve app,
the project's judge client, measurement, JSON), and the text-only judge folder it writes for vLLM."""

import json

import pytest
from ports import free_port

pytestmark = pytest.mark.slow


def test_lexical_judge_benchmark_writes_its_metrics(ray_cluster, tmp_path):
    from benchmarks.bench_judge import main

    path = main([str(tmp_path / "assets"), "--llm", "lexical", "--verdicts", "24", "--warmup", "4",
                 "--http-port", str(free_port()), "--step-generation-s", "30", "--out", str(tmp_path)])
    assert path == tmp_path / "judge_lexical_serve.json"
    row = json.loads(path.read_text())["metrics"]["lexical"]
    assert row["error"] is None, row["error"]
    assert row["verdicts"] == 24 and row["fallbacks"] == 0 and row["unparseable"] == 0
    assert row["judge_verdicts_per_s"] > 0 and row["judge_p99_s"] >= row["judge_p50_s"] > 0
    assert row["judge_seconds_per_step_per_gpu"] == pytest.approx(1024 / row["judge_verdicts_per_s"])
    assert row["judge_gpus_needed"] >= 1


def test_judge_folder_has_qwen_chat_tokenizer(tmp_path):
    """What the vLLM judge replica loads: AutoTokenizer and its chat template over the judge's messages."""
    from transformers import AutoTokenizer

    from benchmarks.assets import JUDGE32B_AWQ, write_judge_dir
    from benchmarks.bench_judge import judge_inputs
    from judge.verdicts import judge_messages

    path = write_judge_dir(tmp_path / "judge32b_awq", JUDGE32B_AWQ)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq" and config["num_hidden_layers"] == 64
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    response, annotations = judge_inputs(1)[0]
    prompt = tok.apply_chat_template(judge_messages(response, annotations), tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == config["eos_token_id"]
    assert len(tok(prompt).input_ids) < 8192 - 512  # fits the benchmark's max_model_len with 512 new tokens
