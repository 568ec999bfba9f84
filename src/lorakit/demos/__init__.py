"""The demos behind ``lorakit demo``: each runs a job on the real default model and prints what it found."""
