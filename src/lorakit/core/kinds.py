"""How LoRA attaches to each supported type of base layer.

A :class:`LayerKind` knows, for one base-layer type, the shapes of ``A`` and ``B``, how to initialise
them, the two halves of the adapter path (``down``: input -> rank-r code; ``up``: code -> output
delta), and the dense weight delta ``B A`` in the base weight's own layout (for merging).
Built in: ``nn.Linear``, GPT-2 style ``Conv1D`` (weight stored in x out), ``nn.Embedding`` and
``nn.Conv2d``. Shapes follow PEFT so that adapters load in either library unchanged.

Kinds live in a registry keyed by module type: :func:`register_kind` lets packages above core add
theirs (quantized layers register themselves when imported; core never imports them), and
:func:`kind_of` picks the kind of the most specific registered type in a module's class hierarchy,
so a subclass of ``nn.Linear`` is a Linear unless it registered a kind of its own.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError, StateError, TargetError


class LayerKind(ABC):
    """The LoRA arithmetic for one base-layer type; a new type gets a subclass and :func:`register_kind`."""

    name: str
    peft_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    """The suffixes PEFT uses for A and B of this kind in ``adapter_model.safetensors``."""

    all_linear = False
    """Whether ``targets="all-linear"`` picks modules of this kind."""

    def check(self, base: nn.Module, name: str) -> None:  # noqa: B027  (a hook: by default every module is fine)
        """Raise a :class:`TargetError` if module ``name`` is configured in a way this kind cannot adapt."""

    def check_merge(self, base: nn.Module, name: str) -> None:  # noqa: B027  (a hook: by default merging works)
        """Raise a :class:`StateError` if adapters cannot be folded into module ``name``'s weight (a quantized
        base, whose ``weight`` is computed, not stored)."""

    @abstractmethod
    def shapes(self, base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of ``A`` and ``B`` for a rank-``rank`` adapter on ``base``."""

    def initialise(self, A: torch.Tensor, B: torch.Tensor, init: str) -> None:
        """Fill ``A`` and ``B`` in place so that ``B A = 0`` and the model starts unchanged."""
        with torch.no_grad():
            if init == "kaiming":
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
    all_linear = True

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


class QuantizedLinearKind(LinearKind):
    """A linear layer whose weight is stored quantized (bitsandbytes' ``Linear4bit`` and ``Linear8bitLt``,
    lorakit's ``NFLinear``): the adapter sits beside it as on ``nn.Linear`` (QLoRA: Dettmers et al. 2023), but
    nothing is merged into it in place, since folding ``s B A`` into quantized codes means dequantize, add,
    requantize (:mod:`lorakit.quant.dequantize`, :mod:`lorakit.quant.requantize`)."""

    name = "QuantizedLinear"

    @staticmethod
    def scheme(base: nn.Module) -> str:
        """The name of ``base``'s quantization, recorded with adapters trained on it: the layer's own
        ``quantization_scheme`` (lorakit's ``NFLinear``: ``"nf4"``, ...), else bitsandbytes' (``"int8"``,
        ``"bnb-nf4"``, ``"bnb-fp4"``)."""
        own = getattr(base, "quantization_scheme", None)
        if own is not None:
            return own
        if type(base).__name__ == "Linear8bitLt":
            return "int8"
        return f"bnb-{getattr(base.weight, 'quant_type', 'unknown')}"

    def check_merge(self, base, name):
        raise StateError(f"module {name!r} is a quantized {type(base).__name__}: an adapter cannot be merged into "
                         "quantized codes in place; nothing was merged (lorakit merge --into dequantized|requantized|"
                         "original does it with the error measured; in Python, lorakit.quant.dequantize_bases first)")


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

    def check(self, base, name):
        if base.groups != 1 or base.padding_mode != "zeros":
            raise TargetError(f"module {name!r} is an nn.Conv2d with groups={base.groups} and "
                              f"padding_mode={base.padding_mode!r}; lorakit supports groups=1 and 'zeros'")

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


@dataclass(frozen=True)
class _Registered:
    kind: type[LayerKind]
    label: str


_KINDS: dict[str, _Registered] = {}
"""Module type (``module.QualName``) -> its kind, in registration order."""


def _type_name(module_type: type) -> str:
    return f"{module_type.__module__}.{module_type.__qualname__}"


def register_kind(module_type: type | str, kind: type[LayerKind], *, label: str | None = None) -> None:
    """Adapt modules of ``module_type``, and of its subclasses that have no kind of their own, with ``kind``.

    ``module_type`` may be its qualified name (``"transformers.pytorch_utils.Conv1D"``), so that
    registering never imports the package defining it. ``label`` names the type in errors (default:
    the class name). Registering the same kind again changes nothing; another kind is refused.
    """
    key = module_type if isinstance(module_type, str) else _type_name(module_type)
    known = _KINDS.get(key)
    if known is not None and known.kind is not kind:
        raise ConfigError(f"module type {key} already has the layer kind {known.kind.__name__}; "
                          f"cannot register {kind.__name__} for it too")
    _KINDS[key] = _Registered(kind, label or key.rpartition(".")[2])


def known_kinds() -> list[str]:
    """The labels of the module types lorakit can adapt, in registration order."""
    return [registered.label for registered in _KINDS.values()]


def _registered_kind(module: nn.Module) -> type[LayerKind] | None:
    for module_type in type(module).__mro__:  # most specific first
        registered = _KINDS.get(_type_name(module_type))
        if registered is not None:
            return registered.kind
    return None


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module``'s registered kind is :class:`QuantizedLinearKind` (a linear whose weight is stored
    quantized: bitsandbytes' layers, lorakit's ``NFLinear``)."""
    kind = _registered_kind(module)
    return kind is not None and issubclass(kind, QuantizedLinearKind)


def kind_of(module: nn.Module, name: str) -> LayerKind:
    """The :class:`LayerKind` of ``module`` (named ``name`` in errors); a :class:`TargetError` names an
    unsupported type and lists the known ones."""
    kind = _registered_kind(module)
    if kind is None:
        raise TargetError(f"module {name!r} has type {type(module).__name__}, which lorakit cannot adapt; "
                          f"supported types: {', '.join(known_kinds())}")
    instance = kind()
    instance.check(module, name)
    return instance


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer in the sense of ``"all-linear"`` (Linear or Conv1D)."""
    kind = _registered_kind(module)
    return kind is not None and kind.all_linear


def is_supported(module: nn.Module) -> bool:
    """Whether lorakit has a kind for ``module``'s type."""
    return _registered_kind(module) is not None


register_kind(nn.Linear, LinearKind, label="nn.Linear")
register_kind("transformers.pytorch_utils.Conv1D", Conv1DKind, label="Conv1D (transformers)")
register_kind(nn.Embedding, EmbeddingKind, label="nn.Embedding")
register_kind(nn.Conv2d, Conv2dKind, label="nn.Conv2d")
register_kind("bitsandbytes.nn.modules.Linear4bit", QuantizedLinearKind, label="Linear4bit (bitsandbytes)")
register_kind("bitsandbytes.nn.modules.Linear8bitLt", QuantizedLinearKind, label="Linear8bitLt (bitsandbytes)")
