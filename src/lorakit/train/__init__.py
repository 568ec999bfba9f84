"""Training: the loop, its schedule and loss, resumable checkpoints and metrics."""

from lorakit.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
