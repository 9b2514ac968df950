"""The CPU generation engine: transformers `generate` on a Qwen2.5-VL loaded by path, n samples per
prompt, behaviour logprobs from the processed scores (the distribution each token was drawn from).

Weights arrive through the learner's broadcast group (`core.weights`) into a staging copy while
generate() may be running; `apply_staged_weights()` swaps them in at the next safe point.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

from core import vl
from core.config import DataConfig
from core.records import (
    Prompt,
    Rollout,
    RolloutGroup,
    Sampling,
    WeightGroupSpec,
    WeightManifest,
)
from core.weights import digest, open_group, receive, weight_corners


def load_model(model_path: str, *, random_weights: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForImageTextToText

    if random_weights:
        return AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_path), dtype=dtype)
    return AutoModelForImageTextToText.from_pretrained(model_path, dtype=dtype)


class HFEngine:
    def __init__(self, model_path: str, *, data: DataConfig, num_threads: int = 1,
                 device: str = "cpu", random_weights: bool = False) -> None:
        torch.set_num_threads(num_threads)
        self.device = torch.device(device)
        self.data = data
        self.model = load_model(model_path, random_weights=random_weights).to(self.device)
        self.model.eval()
        self.processor = vl.load_processor(model_path)
        self.tokenizer = self.processor.tokenizer
        self.eos_id = self.model.generation_config.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id
        self.suppressed = vl.suppressed_token_ids(self.tokenizer)
        self._version = 0
        self._staged: tuple[int, dict[str, torch.Tensor]] | None = None
        self._lock = threading.Lock()
        self._group = None

    @property
    def version(self) -> int:
        return self._version

    # ------------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], *, sampling: Sampling, actor_id: int) -> list[RolloutGroup]:
        return [self._generate_one(p, sampling=sampling, actor_id=actor_id, seed=sampling.seed + i)
                for i, p in enumerate(prompts)]

    def _generate_one(self, prompt: Prompt, *, sampling: Sampling, actor_id: int, seed: int) -> RolloutGroup:
        start = time.perf_counter()
        inputs = vl.encode_prompt(self.processor, prompt, data=self.data)
        kwargs = {k: v.to(self.device) for k, v in inputs.generate_kwargs().items()}
        torch.manual_seed(seed)
        greedy = sampling.temperature == 0
        out = self.model.generate(
            **kwargs, do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=0, num_return_sequences=sampling.n,
            max_new_tokens=sampling.max_new_tokens, output_scores=True, return_dict_in_generate=True,
            eos_token_id=self.eos_id, pad_token_id=self.pad_id, suppress_tokens=self.suppressed)
        completions = out.sequences[:, inputs.num_tokens:]
        logprobs = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # [n, T, V], processed scores
        rollouts = tuple(self._rollout(completions[i], logprobs[i]) for i in range(sampling.n))
        return RolloutGroup(prompt=prompt, prompt_token_ids=inputs.input_ids.numpy().astype(np.int32),
                            rollouts=rollouts, actor_id=actor_id, generate_seconds=time.perf_counter() - start)

    def _rollout(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> Rollout:
        """Cut at the first EOS (kept) and pick each sampled token's logprob."""
        hits = (tokens == self.eos_id).nonzero()
        length = int(hits[0]) + 1 if len(hits) else len(tokens)
        ids = tokens[:length].cpu()
        lp = logprobs[:length].gather(-1, tokens[:length, None]).squeeze(-1).cpu()
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Rollout(token_ids=ids.numpy().astype(np.int32), logprobs=lp.numpy().astype(np.float32), text=text,
                       finish_reason="stop" if len(hits) else "length", min_version=self._version,
                       max_version=self._version)

    # ------------------------------------------------------------------------------------- weights
    def join_weight_group(self, spec: WeightGroupSpec) -> None:
        self._group = open_group(backend=spec.backend, host=spec.host, port=spec.port, rank=spec.rank,
                                 world_size=spec.world_size, timeout_s=spec.timeout_s)
        self._timeout_s = spec.timeout_s

    def receive_weights(self, manifest: WeightManifest) -> None:
        assert self._group is not None, "receive_weights before join_weight_group"
        staged = {name: t for name, t in
                  receive(self._group, manifest, device=self.device, timeout_s=self._timeout_s)}
        with self._lock:
            self._staged = (manifest.version, staged)

    def apply_staged_weights(self) -> bool:
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is None:
            return False
        version, tensors = staged
        self.model.load_state_dict(tensors, strict=True)
        self._version = version
        return True

    def weights_digest(self) -> str:
        """`core.weights.digest` of every weight (bit-exact comparison with the learner's)."""
        return digest(self.model.state_dict().items())

    def weight_samples(self, suffixes: Sequence[str]) -> dict[str, list]:
        return weight_corners(self.model.state_dict().items(), suffixes)

    @property
    def sync_ranks(self) -> int:
        return 1
