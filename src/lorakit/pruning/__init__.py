"""Structured pruning for LoRA: LoRAM (train on a pruned base, recover the adapter for the full one) and PAT
(pruning-aware tuning: hybrid sparsification modules and one shared channel mask, then physical removal)."""
