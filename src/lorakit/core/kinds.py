"""How LoRA attaches to each supported type of base layer.

A :class:`LayerKind` knows, for one base-layer type, the shapes of ``A`` and ``B``, how to initialise
them, the two halves of the adapter path (``down``: input -> rank-r code; ``up``: code -> output
delta), and the dense weight delta ``B A`` in the base weight's own layout (for merging).
Supported: ``nn.Linear``, GPT-2 style ``Conv1D`` (weight stored in x out), ``nn.Embedding`` and
``nn.Conv2d``. Shapes follow PEFT so that adapters load in either library unchanged.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import TargetError


class LayerKind(ABC):
    """The LoRA arithmetic for one base-layer type."""

    name: str
    peft_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    """The suffixes PEFT uses for A and B of this kind in ``adapter_model.safetensors``."""

    @abstractmethod
    def shapes(self, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``A`` and ``B`` for a rank-``rank`` adapter on ``base``."""

    def initialise(self, A: torch.Tensor, B: torch.Tensor, init: str) -> None:
        """Fill ``A`` and ``B`` in place so that ``B A = 0`` and the model starts unchanged."""
        with torch.no_grad():
            if init == "default":
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(A, std=1.0 / A.shape[0])
            else:
                A.zero_()
            B.zero_()

    @abstractmethod
    def down(self, base: nn.Module, x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """The rank-r code of the input, e.g. ``x A^T`` for a linear layer."""

    @abstractmethod
    def up(self, code: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The output delta of a code, e.g. ``code B^T`` for a linear layer (unscaled)."""

    def add_up(self, result: torch.Tensor, code: torch.Tensor, B: torch.Tensor, weight: float) -> torch.Tensor:
        """``result + weight * up(code, B)``, in ``result``'s dtype (a new tensor)."""
        return result + (self.up(code, B) * weight).to(result.dtype)

    @abstractmethod
    def delta_weight(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """``B A`` laid out like ``base.weight`` (unscaled)."""

    uses_dropout = True
    """Whether the adapter's dropout applies to its input (PEFT applies none on embeddings)."""


class LinearKind(LayerKind):
    """``nn.Linear``: ``A`` is (r, in), ``B`` is (out, r); ``delta = x A^T B^T``."""

    name = "Linear"

    def shapes(self, base, rank):
        return (rank, base.in_features), (base.out_features, rank)

    def down(self, base, x, A):
        return F.linear(x, A)

    def up(self, code, B):
        return F.linear(code, B)

    def add_up(self, result, code, B, weight):
        """One ``addmm``: the scale and the sum ride on the product, with no (tokens x out) temporaries; in
        place into the base layer's fresh output when autograd records nothing (inference)."""
        if result.dtype != code.dtype:
            return super().add_up(result, code, B, weight)
        flat_code = code.reshape(-1, code.shape[-1])
        if not (result.requires_grad or code.requires_grad) and result.is_contiguous() and result._base is None:
            return result.view(-1, result.shape[-1]).addmm_(flat_code, B.t(), alpha=weight).view(result.shape)
        return torch.addmm(result.reshape(-1, result.shape[-1]), flat_code, B.t(), alpha=weight).view(result.shape)

    def delta_weight(self, A, B):
        return B @ A


class Conv1DKind(LinearKind):
    """transformers' GPT-2 ``Conv1D``, a linear layer whose weight is stored (in, out)."""

    name = "Conv1D"

    def shapes(self, base, rank):
        d_in, d_out = base.weight.shape
        return (rank, d_in), (d_out, rank)

    def delta_weight(self, A, B):
        return (B @ A).T


class EmbeddingKind(LayerKind):
    """``nn.Embedding``: ``A`` is (r, vocab), ``B`` is (dim, r); the code of token t is column t of A.

    Initialised with ``A = 0`` and ``B ~ N(0, 1)`` (PEFT's convention), so the delta starts at zero.
    """

    name = "Embedding"
    peft_keys = ("lora_embedding_A", "lora_embedding_B")
    uses_dropout = False

    def shapes(self, base, rank):
        return (rank, base.num_embeddings), (base.embedding_dim, rank)

    def initialise(self, A, B, init):
        with torch.no_grad():
            A.zero_()
            if init == "zeros":
                B.zero_()
            else:
                nn.init.normal_(B)

    def down(self, base, x, A):
        return F.embedding(x, A.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                           sparse=base.sparse)

    def up(self, code, B):
        return F.linear(code, B)

    def delta_weight(self, A, B):
        return (B @ A).T


class Conv2dKind(LayerKind):
    """``nn.Conv2d``: ``A`` is a conv with the base's kernel (r, in, kh, kw), ``B`` a 1x1 conv (out, r)."""

    name = "Conv2d"

    def shapes(self, base, rank):
        return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)

    def down(self, base, x, A):
        return F.conv2d(x, A, stride=base.stride, padding=base.padding, dilation=base.dilation)

    def up(self, code, B):
        return F.conv2d(code, B)

    def delta_weight(self, A, B):
        if A.shape[2:] == (1, 1):
            return (B.flatten(1) @ A.flatten(1)).reshape(B.shape[0], A.shape[1], 1, 1)
        # A composed with a 1x1 B is one conv with kernel sum_r B[o, r] A[r, i, :, :].
        return torch.einsum("or,rihw->oihw", B.flatten(1), A)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the core works on plain torch models too
        return None
    return Conv1D


def kind_of(module: nn.Module, name: str) -> LayerKind:
    """The :class:`LayerKind` of ``module``; a :class:`TargetError` names unsupported types."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return Conv1DKind()
    if isinstance(module, nn.Linear):
        return LinearKind()
    if isinstance(module, nn.Embedding):
        return EmbeddingKind()
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise TargetError(f"module {name!r} is an nn.Conv2d with groups={module.groups} and "
                              f"padding_mode={module.padding_mode!r}; lorakit supports groups=1 and 'zeros'")
        return Conv2dKind()
    raise TargetError(f"module {name!r} has type {type(module).__name__}, which lorakit cannot adapt; "
                      f"supported types: {', '.join(SUPPORTED_TYPES)}")


SUPPORTED_TYPES = ("nn.Linear", "Conv1D (transformers)", "nn.Embedding", "nn.Conv2d")


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer in the sense of ``"all-linear"`` (Linear or Conv1D)."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_supported(module: nn.Module) -> bool:
    """Whether lorakit can wrap ``module``."""
    return is_linear(module) or isinstance(module, (nn.Embedding, nn.Conv2d))
