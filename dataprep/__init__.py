"""Datasets into prompt records: loaders, the synthetic geometry generator, and data preparation."""
