"""The bottom of the house: what every role shares (config schema and files, typed records and their
codec, the seams, Qwen2.5-VL input encoding, the weight wire, the vLLM compatibility module, and the
offline pipelines' OpenAI calls and progress logs). Imports no role and nothing above it."""
