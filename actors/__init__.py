"""Generation actors: an engine (HF generate on CPU, vLLM on GPU) behind one Ray actor."""
