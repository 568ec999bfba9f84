"""A LoRA adapter alone as a GGUF LoRA file, as llama.cpp reads them (``llama-cli -m base.gguf --lora FILE``).

The file declares ``general.type = "adapter"``, ``adapter.type = "lora"`` and ``adapter.lora.alpha``, and holds
per adapted linear ``blk.N.attn_q.weight.lora_a`` (A, (r, d_in)) and ``.lora_b`` (B, (d_out, r)) in float32.
llama.cpp scales ``B A`` by ``alpha / r`` (r read from the tensors), so where a module's scale is something else
(rsLoRA, rank or alpha patterns) the difference is folded into B; B's rows of the query and key projections
are in llama.cpp's order (:func:`lorakit.io.gguf_llama.llama_cpp_row_order`), like the base weights' rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import torch
from transformers import PretrainedConfig

from lorakit.errors import ConfigError
from lorakit.io.factors import AdapterFactors, read_adapter_factors
from lorakit.io.gguf_file import refuse_existing, write_gguf
from lorakit.io.gguf_llama import ARCHITECTURE, check_llama_like, llama_cpp_row_order, tensor_name


def export_gguf_lora(adapter: str | Path, out: str | Path, *, config: PretrainedConfig, force: bool = False) -> Path:
    """Write the PEFT-format adapter directory ``adapter``, trained on a Llama base with ``config``, to the GGUF
    LoRA file ``out``. An existing ``out`` is refused unless ``force``, a base that is not a plain Llama and an
    adapter on a module llama.cpp cannot adapt (an embedding, a head tied to it) by name. Returns ``out``."""
    out = Path(out)
    check_llama_like(config)
    refuse_existing(out, force=force)
    factors = read_adapter_factors(adapter)
    tensors = dict(llama_cpp_lora_tensors(factors, config))

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(factors.config.alpha))
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor.float().numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)

    return write_gguf(out, ARCHITECTURE, fill)


def llama_cpp_lora_tensors(factors: AdapterFactors, config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Each adapted module's ``(name.lora_a, A)`` and ``(name.lora_b, B')`` under llama.cpp's names, where
    ``(alpha / r) B' A`` is the module's update ``scale B A`` with B's rows in llama.cpp's order."""
    alpha = factors.config.alpha
    for module, pair in factors.modules.items():
        name = tensor_name(config, module) if pair.is_linear else None
        if name is None or (name == "output" and config.tie_word_embeddings):
            raise ConfigError(f"{factors.path}: the adapter adapts {module!r}, which a llama.cpp LoRA file cannot "
                              "hold (only the linear layers of the decoder blocks and an untied output head)")
        llama_cpp_scale = alpha / pair.A.shape[0]  # llama.cpp's scale of B A: alpha / r
        yield f"{name}.weight.lora_a", pair.A  # (r, d_in)
        yield f"{name}.weight.lora_b", llama_cpp_row_order(pair.B, config, name) * (pair.scale / llama_cpp_scale)
