"""Evaluation: benchmark loaders, generation, the reference's and math-verify scoring, perception labels, McNemar."""
