"""Evaluation and generation: exact match and loss, batched generation with the KV cache, composite prompts."""
