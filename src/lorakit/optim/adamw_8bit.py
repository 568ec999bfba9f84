"""bitsandbytes' 8-bit AdamW (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022): Adam's
two moments ``m`` and ``v`` stored as 8-bit codes of a dynamic (non-linear) map, one absmax per block of 256
values, and dequantized for each update; tensors of fewer than 4,096 values keep fp32 moments. The states take
about 2 bytes per parameter instead of AdamW's 8.

bitsandbytes is optional: it is imported only when this optimizer is chosen (``--optimizer adamw8bit``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lorakit.errors import ConfigError


def adamw_8bit(parameters: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """``bitsandbytes.optim.AdamW8bit`` on ``parameters``; a :class:`ConfigError` says how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("the optimizer 'adamw8bit' needs bitsandbytes, which is not installed: "
                          "pip install 'bitsandbytes>=0.50' (it runs on the CPU and on CUDA)") from None
    return bitsandbytes.optim.AdamW8bit(parameters, lr=lr, weight_decay=weight_decay)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The bytes an optimizer's per-parameter state tensors take (moments, codes, scales)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value))
