"""Sharded loading (learner/sharded_load.py): the policy's weights equal transformers' own load, bit for bit,
in one process and in two gloo ranks under FSDP2, and each rank reads only its own shards of the files."""

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from ports import free_port

from core.config import LearnerConfig
from learner.policy import load_policy

SPAWN_BOUND_S = 240


def reference(path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)


def assert_same(loaded: dict[str, torch.Tensor], expected: torch.nn.Module) -> None:
    want = expected.state_dict()
    assert set(loaded) == set(want)
    for name, tensor in want.items():
        assert loaded[name].dtype == torch.float32, name
        assert torch.equal(loaded[name], tensor), name


def file_bytes(path) -> int:
    from safetensors import safe_open

    total = 0
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                total += torch.Size(piece.get_shape()).numel() * {"F32": 4, "BF16": 2, "F16": 2}[piece.get_dtype()]
    return total


def test_one_process_loads_what_from_pretrained_loads(tiny_model_dir):
    model, stats = load_policy(tiny_model_dir, cfg=LearnerConfig(), device=torch.device("cpu"))
    expected = reference(tiny_model_dir)
    assert_same(model.state_dict(), expected)
    buffers = dict(model.named_buffers())  # the rotary inv_freq: in no file, computed
    for name, buffer in expected.named_buffers():
        assert torch.equal(buffers[name], buffer), name
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert stats.read_bytes == file_bytes(tiny_model_dir)
    assert stats.seconds > 0 and stats.peak_host_bytes > 0


@pytest.fixture(scope="module")
def tied_bf16_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with tied embeddings (lm_head is embed_tokens, absent from the file), saved in bfloat16."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("tied-bf16")
    model.save_pretrained(out)
    return str(out)


def test_tied_embeddings_and_bf16_files_load_as_fp32_master_weights(tied_bf16_dir):
    from safetensors import safe_open

    with safe_open(str(Path(tied_bf16_dir) / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys() and f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    model, _ = load_policy(tied_bf16_dir, cfg=LearnerConfig(), device=torch.device("cpu"))
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert_same(model.state_dict(), reference(tied_bf16_dir))


def test_a_folder_missing_a_tensor_is_refused_by_name(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors"):
            os.symlink(Path(tiny_model_dir) / name, tmp_path / name)
    tensors = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lack \['model.language_model.norm.weight'\]"):
        load_policy(str(tmp_path), cfg=LearnerConfig(), device=torch.device("cpu"))


# ------------------------------------------------------------------------ two gloo ranks, FSDP2
def _rank_main(rank: int, world: int, port: int, model_dirs: list[str], out_dir: str) -> None:
    import safetensors
    import torch.distributed as dist
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the sharded load must not call from_pretrained")

    transformers.AutoModelForImageTextToText.from_pretrained = refuse
    materialised = _count_materialised(safetensors)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        for i, model_dir in enumerate(model_dirs):
            materialised[0] = 0
            _load_and_save(model_dir, Path(out_dir) / f"{i}-rank{rank}", materialised)
    finally:
        dist.destroy_process_group()


def _load_and_save(model_dir: str, out: Path, materialised: list[int]) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    model, stats = load_policy(model_dir, cfg=LearnerConfig(), device=torch.device("cpu"))
    local = sum(p.to_local().numel() * 4 for p in model.parameters())
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    torch.save({"state": full, "buffers": dict(model.named_buffers())}, out.with_suffix(".pt"))
    result = {"read_bytes": stats.read_bytes, "materialised": materialised[0], "local_param_bytes": local,
              "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()), "tied": tied}
    out.with_suffix(".json").write_text(json.dumps(result))


def _count_materialised(safetensors_module) -> list[int]:
    """Wrap `safetensors.safe_open` so every tensor read from a file (whole or sliced) is counted in bytes:
    what this process materialised from the model files, measured outside the loader."""
    count = [0]
    original = safetensors_module.safe_open

    class Slice:
        def __init__(self, inner):
            self.inner = inner

        def __getitem__(self, index):
            t = self.inner[index]
            count[0] += t.numel() * t.element_size()
            return t

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class Opened:
        def __init__(self, *args, **kwargs):
            self.inner = original(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_slice(self, key):
            return Slice(self.inner.get_slice(key))

        def get_tensor(self, key):
            t = self.inner.get_tensor(key)
            count[0] += t.numel() * t.element_size()
            return t

        def __getattr__(self, name):
            return getattr(self.inner, name)

    safetensors_module.safe_open = Opened
    return count


def test_two_gloo_ranks_each_read_only_their_shards(tiny_model_dir, tied_bf16_dir, tmp_path):
    import torch.multiprocessing as mp

    dirs = [tiny_model_dir, tied_bf16_dir]
    context = mp.start_processes(_rank_main, args=(2, free_port(), dirs, str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_BOUND_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the two ranks did not finish within {SPAWN_BOUND_S}s")
    for i, model_dir in enumerate(dirs):
        ranks = [json.loads((tmp_path / f"{i}-rank{r}.json").read_text()) for r in range(2)]
        total = file_bytes(model_dir)
        assert all(r["sharded"] for r in ranks)
        assert all(r["tied"] for r in ranks) == (model_dir == tied_bf16_dir)
        assert sum(r["read_bytes"] for r in ranks) == total  # together the ranks read the model once
        for r in ranks:
            assert r["materialised"] == r["read_bytes"]  # counted outside the loader, at safetensors
            assert r["read_bytes"] < 0.6 * total  # each about half: no rank materialises the full model
            assert r["local_param_bytes"] < 0.6 * total * (4 if model_dir == tied_bf16_dir else 1)
        expected = reference(model_dir)
        for r in range(2):  # every rank holds the same model, gathered from the two ranks' shards
            saved = torch.load(tmp_path / f"{i}-rank{r}.pt", weights_only=True)
            assert_same(saved["state"], expected)
            for name, buffer in expected.named_buffers():
                assert torch.equal(saved["buffers"][name], buffer), name
