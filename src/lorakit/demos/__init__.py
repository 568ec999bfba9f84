"""The demos behind ``lorakit demo``: each runs a job on the real default model and prints what it found.

A demo is a settings dataclass (its fields are the flags of ``lorakit demo NAME``, its defaults the
demo's) and a ``run_*_demo(settings, base=..., report=...)`` function."""
