"""The evaluation sets that come from the training-data readers, Geometry3K's test split and the
synthetic geometry set, as `evaluation` benchmark items. It lives at the top because it joins two
roles: data preparation reads the prompts, evaluation scores them."""

from __future__ import annotations

from pathlib import Path

from core.config import SyntheticDataConfig
from dataprep.loaders import load_prompts
from dataprep.synthetic import make_problems
from evaluation.benchmarks import LOADERS, BenchmarkItem, prompt_items


def load_geometry3k(path: str | Path) -> list[BenchmarkItem]:
    """Geometry3K test through the training-data reader (InterGPS split folder or parquet); bad rows raise."""
    return prompt_items("geometry3k", load_prompts(path, on_bad_row="raise"))


def load_synthetic(path: str | Path | None = None, *, num_problems: int = 64, seed: int = 0) -> list[BenchmarkItem]:
    """Our synthetic geometry set: generated (`num_problems`, `seed`), or read from a prepare-data file."""
    if path is not None:
        return prompt_items("synthetic", load_prompts(path, on_bad_row="raise"))
    return prompt_items("synthetic", make_problems(SyntheticDataConfig(num_problems=num_problems, seed=seed)))


def load_benchmark(name: str, path: str | None, *, num_synthetic: int = 64, synthetic_seed: int = 0) -> list[BenchmarkItem]:
    """Any benchmark the `eval` command knows, by name."""
    if name == "synthetic":
        return load_synthetic(path, num_problems=num_synthetic, seed=synthetic_seed)
    if name == "geometry3k":
        return load_geometry3k(path)
    return LOADERS[name](path)
