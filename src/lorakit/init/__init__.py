"""Adapter initialisations computed before training: LoRA-GA (gradients), EVA (activations), LQ-LoRA and LoftQ
(a quantized base plus a low-rank start)."""
