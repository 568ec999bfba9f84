"""End-to-end jobs, one module each: what one CLI command runs (load a base, train or evaluate, write files)."""
