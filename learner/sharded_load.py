"""The policy's weights from a model folder's safetensors files, each rank reading only its own shards:

    config.json ──> model on the meta device ──fully_shard (FSDP2, when torch.distributed is up)──>
    to_empty(device): each rank's shards, uninitialised ──dcp.load(HuggingFaceStorageReader)──>
    each rank reads the slices of its shards (safetensors `get_slice`), cast to the parameter dtype ──>
    non-persistent buffers (the rotary inv_freq) computed as transformers computes them after its own load

No rank holds the whole model on the host: host memory per rank stays near one tensor slice plus the
slices it owns, where `from_pretrained` on every rank held 4 bytes x the parameter count (~33 GB at 7B).
Without torch.distributed the same path loads the whole model (one process owns every shard). The
file keys map to the model's parameter names through transformers' own conversion mapping (Qwen2.5-VL
folders store `model.layers.*` and `visual.*`, the model names them `model.language_model.*` and
`model.visual.*`); a tied weight (lm_head = embed_tokens) is one parameter, read once.
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader


@dataclass(frozen=True, slots=True)
class LoadStats:
    """What loading the weights cost this rank."""

    seconds: float
    read_bytes: int
    """Bytes of tensor data this rank read from the safetensors files (in the files' dtype)."""
    peak_host_bytes: int
    """The process's peak resident host memory (ru_maxrss) when the load ended."""


def build_on_meta(model_path: str | Path, *, attn_implementation: str) -> torch.nn.Module:
    """The model of `model_path/config.json` on the meta device: parameters with shapes, no memory."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, dtype=torch.float32,
                                                        attn_implementation=attn_implementation)


def load_weights(model: torch.nn.Module, model_path: str | Path, *, names: dict[str, str],
                 device: torch.device) -> LoadStats:
    """Materialise `model` (built by `build_on_meta`, sharded or not) on `device` and fill every parameter
    and persistent buffer from the folder's safetensors files (`names`: from `file_names`, taken before
    sharding); this rank reads only its own shards."""
    start = time.perf_counter()
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each module its own new tensor: lm_head and embed_tokens are one again
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    state = {key: tensors[name].detach() for key, name in names.items()}  # DTensors under FSDP2: loaded in place
    reader = _CountingReader(str(model_path))
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": without dist, it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    init_buffers(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return LoadStats(seconds=time.perf_counter() - start, read_bytes=reader.read_bytes, peak_host_bytes=peak)


def file_names(model: torch.nn.Module, model_path: str | Path) -> dict[str, str]:
    """{file key: the model's name for it}, checked both ways: every file tensor has a place in the model,
    and every parameter and persistent buffer of the model is in the files (or tied to one that is).
    Call before sharding (transformers finds the model's conversion mapping by its class)."""
    from safetensors import safe_open

    files = sorted(Path(model_path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_path} holds no *.safetensors files; the learner loads a model folder saved "
                         "with safetensors (transformers' save_pretrained default)")
    to_model = _renamer(model)
    names = model.state_dict(keep_vars=True)
    mapping: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            mapping.update({key: to_model(key) for key in f.keys()})
    unknown = sorted(k for k, name in mapping.items() if name not in names)
    if unknown:
        raise ValueError(f"{files[0].parent}: tensors {unknown[:5]} (of {len(unknown)}) have no place in the "
                         f"{type(model).__name__} its config.json builds; the folder's weights and config disagree")
    loaded = {id(names[name]) for name in mapping.values()}
    missing = sorted(name for name, t in names.items() if id(t) not in loaded)
    if missing:
        raise ValueError(f"{files[0].parent}: the safetensors files lack {missing[:5]} (of {len(missing)}); "
                         "the folder is incomplete or belongs to another model")
    return mapping


def _renamer(model: torch.nn.Module):
    """file key -> parameter name, by transformers' conversion mapping for this model (renamings only)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()

    def to_model(key: str) -> str:
        name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converter is not None:
            raise ValueError(f"{key}: transformers converts this tensor on load ({converter}), which the sharded "
                             "load does not do; save the model with save_pretrained first")
        return name

    return to_model


def init_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers are in no file: computed by transformers' `_init_weights` for their module,
    as `from_pretrained` does after its meta-device load. NaN first, so a buffer it leaves alone is caught."""
    owners = {name.rpartition(".")[0] for name, _ in _non_persistent_buffers(model)}
    with torch.no_grad():
        for _, buffer in _non_persistent_buffers(model):
            if buffer.is_floating_point():
                buffer.fill_(math.nan)
        for owner in sorted(owners):
            model._init_weights(model.get_submodule(owner))
    left = [name for name, b in _non_persistent_buffers(model) if b.is_floating_point() and b.isnan().any()]
    if left:
        raise RuntimeError(f"transformers' _init_weights left the buffers {left} uninitialised; this model type "
                           "needs its own buffer init in learner/sharded_load.py")


def _non_persistent_buffers(model: torch.nn.Module):
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


class _CountingReader(HuggingFaceStorageReader):
    """torch's safetensors reader (slices via `get_slice`), counting the bytes this rank asks for."""

    read_bytes = 0

    def read_data(self, plan, planner):
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            self.read_bytes += math.prod(item.lengths) * info.dtype.itemsize
        return super().read_data(plan, planner)
