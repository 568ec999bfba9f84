"""The multi-adapter layer, target injection, routing, and the operations on a model's adapters."""
