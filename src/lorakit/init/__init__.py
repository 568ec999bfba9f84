"""Adapter initialisations that look at data: LoRA-GA (gradients) and EVA (activations)."""
