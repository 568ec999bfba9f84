"""Optimizers for LoRA factors: LoRA-Pro (full-gradient matching), ALLoRA (norm-adaptive rates) and bitsandbytes'
8-bit AdamW (smaller optimizer states)."""
