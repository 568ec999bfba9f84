"""Optimizers for LoRA factors: LoRA-Pro (full-gradient matching) and ALLoRA (norm-adaptive rates)."""
