"""Loss regularisers added to the task loss during adapter training (BA-LoRA)."""
