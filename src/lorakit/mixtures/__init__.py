"""Mixtures of LoRA experts. Each computes routing for the core layer; none patches ``forward``."""
