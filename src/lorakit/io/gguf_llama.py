"""What llama.cpp's ``llama`` architecture expects of a Hugging Face Llama model: which models qualify, the
hyper-parameters, the tensor names, and the row order of the query and key projections.

llama.cpp computes rotary embeddings on adjacent pairs of each head's dimensions where Hugging Face's Llama
rotates the two halves of the head, so its converter reorders the rows of ``q_proj`` and ``k_proj`` (per head:
the rows of the first half interleaved with those of the second); transformers' GGUF loader undoes exactly
that. :func:`llama_cpp_row_order` is that reordering, for full weights and for LoRA's ``B`` alike (their rows
are the projection's output rows).
"""

from __future__ import annotations

import gguf
import torch
from transformers import PretrainedConfig

from lorakit.errors import ModelError

ARCHITECTURE = "llama"
"""The llama.cpp architecture the exported files declare."""


def check_llama_like(config: PretrainedConfig) -> None:
    """Refuse, naming what differs, a model llama.cpp's ``llama`` architecture would run differently: another
    model type, biases, another activation, or a RoPE scaling that needs tensors of its own."""
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise ModelError(f"GGUF export supports Llama models (llama.cpp's {ARCHITECTURE!r} architecture); this "
                         f"model is {model_type!r} ({', '.join(getattr(config, 'architectures', None) or ['?'])})")
    differences = [f"{name}={getattr(config, name)!r}" for name, expected in
                   (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu"))
                   if getattr(config, name, expected) != expected]
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type != "default":
        differences.append(f"rope_type={rope_type!r}")
    if differences:
        raise ModelError(f"GGUF export supports plain Llama models; this one has {', '.join(differences)}, "
                         "which the export does not write")


def rope_parameters(config: PretrainedConfig) -> dict:
    """The RoPE settings (transformers 5's ``rope_parameters``, or the older top-level ``rope_theta``)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), **parameters}


def head_dim(config: PretrainedConfig) -> int:
    """The width of one attention head."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hyperparameters(writer: gguf.GGUFWriter, config: PretrainedConfig) -> None:
    """Write the ``llama.*`` hyper-parameters of ``config`` (a model :func:`check_llama_like` accepted)."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def tensor_name(config: PretrainedConfig, module: str) -> str | None:
    """llama.cpp's name of the weight of ``module`` (``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``,
    without ``.weight``), or None for a module the architecture has no tensor for."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    return names.get_name(module)


def llama_cpp_row_order(rows: torch.Tensor, config: PretrainedConfig, name: str) -> torch.Tensor:
    """``rows`` (d_out, ...) of the tensor named ``name`` in llama.cpp's order: reordered per head for the
    query (``attn_q``, the attention heads) and key (``attn_k``, the key-value heads) projections, as they are."""
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(name.split(".")[-1])
    if heads is None:
        return rows
    # (heads, 2 halves, head_dim / 2, ...) -> (heads, head_dim / 2, 2 halves, ...): the halves interleaved
    halves = rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
    return halves.transpose(1, 2).reshape(rows.shape)
