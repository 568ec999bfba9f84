"""Training methods that change the adapter's forward: DyLoRA (nested ranks) and CoDyRA (gated ranks)."""
