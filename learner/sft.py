"""Supervised warm start: next-token loss on worked solutions (response tokens only), saved as a model
folder that `train` loads like any other. A random tiny model never writes the method's format, so
every GRPO reward would be 0; a short SFT leaves it right on some problems and wrong on others.

Single process (the tiny demo model and small real warm starts); the result is cached: a folder
with `sft.json` is complete and is reused as is.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from core import vl
from core.config import DataConfig, SFTConfig
from core.records import Prompt
from learner.grpo import token_logprobs
from learner.policy import Sequence, completion_logits, micro_batches, pack
from learner.schedule import warmup_scheduler

MARKER = "sft.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "config.json")


class SFTInterrupted(Exception):
    """A stop request arrived during the warm start."""


def run_sft(base_model: str, *, cfg: SFTConfig, data: DataConfig, prompts: list[Prompt], out: Path, seed: int,
            max_tokens_per_micro_batch: int = 8192, progress: bool = True,
            should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Train on the solutions, save into `out`; returns the summary (also in `out/sft.json`).
    `should_stop()` true between steps: raises `SFTInterrupted` (nothing is saved)."""
    if (out / MARKER).is_file():
        return json.loads((out / MARKER).read_text())
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    examples = _training_examples(prompts, cfg=cfg, seed=seed)
    model = AutoModelForImageTextToText.from_pretrained(base_model, dtype=torch.float32)
    model.train()
    processor = vl.load_processor(base_model)
    seqs = [_sequence(processor, p, data=data) for p in examples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_scheduler(optimizer, warmup_steps=cfg.warmup_steps)
    suppressed = vl.suppressed_token_ids(processor.tokenizer)
    rng = random.Random(seed)
    losses, start = [], time.perf_counter()
    bar = _bar(cfg.num_steps, progress)
    for _ in range(cfg.num_steps):
        if should_stop():
            if bar is not None:
                bar.close()
            raise SFTInterrupted(f"sft stopped after {len(losses)} of {cfg.num_steps} steps; nothing saved")
        batch = rng.sample(seqs, min(cfg.batch_size, len(seqs)))
        losses.append(_sft_step(model, optimizer, batch, pad_id=processor.tokenizer.pad_token_id,
                                image_token_id=processor.image_token_id, suppressed=suppressed,
                                max_tokens=max_tokens_per_micro_batch))
        scheduler.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar is not None:
        bar.close()
    summary = {"base_model": base_model, "num_examples": len(examples), "num_steps": cfg.num_steps,
               "first_loss": losses[0], "final_loss": sum(losses[-5:]) / len(losses[-5:]),
               "seconds": time.perf_counter() - start}
    _save(model, base_model=base_model, out=out, summary=summary)
    return summary


def _training_examples(prompts: list[Prompt], *, cfg: SFTConfig, seed: int) -> list[Prompt]:
    with_solution = [p for p in prompts if p.solution]
    if not with_solution:
        raise ValueError("sft: no prompt in the dataset has a worked solution (`solution`); use a dataset with "
                         "solutions (the synthetic set, or prepare-data's distilled CoTs) or set sft.enabled: false")
    order = sorted(with_solution, key=lambda p: p.index)
    random.Random(seed).shuffle(order)
    return order[: max(1, int(len(order) * cfg.train_fraction))]


def _sequence(processor, prompt: Prompt, *, data: DataConfig) -> Sequence:
    inputs = vl.encode_prompt(processor, prompt, data=data)
    tokenizer = processor.tokenizer
    ids = tokenizer(prompt.solution, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    completion = torch.tensor(ids, dtype=torch.long)
    return Sequence(prompt_ids=inputs.input_ids, completion_ids=completion, pixel_values=inputs.pixel_values,
                    image_grid_thw=inputs.image_grid_thw, behaviour_logprobs=torch.zeros(len(ids)), advantage=1.0)


def _sft_step(model, optimizer, batch: list[Sequence], *, pad_id: int, image_token_id: int, suppressed: list[int],
              max_tokens: int) -> float:
    """One update: token-mean negative log-likelihood of the solutions, micro-batched."""
    optimizer.zero_grad(set_to_none=True)
    num_tokens = sum(len(s.completion_ids) for s in batch)
    total = 0.0
    for micro in micro_batches(batch, max_tokens=max_tokens):
        packed = pack(micro, pad_id=pad_id, image_token_id=image_token_id, suppressed=suppressed,
                      device=torch.device("cpu"))
        logp = token_logprobs(completion_logits(model, packed), packed.completion_ids)
        loss = -(logp * packed.completion_mask).sum() / num_tokens
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return total


def _save(model, *, base_model: str, out: Path, summary: dict) -> None:
    """Processor and tokenizer files copied from the base folder, weights from training; atomic."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base_model, tmp, ignore=shutil.ignore_patterns(*WEIGHT_FILES, "tiny_model.json", MARKER))
    model.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(summary, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="sft", unit="step", dynamic_ncols=True)
