"""lorakit's own blockwise k-bit NormalFloat quantizer (QLoRA: Dettmers et al. 2023; LQ-LoRA's (b, b0, b1,
B0, B1) configurations: Guo et al., ICLR 2024), its safetensors storage, and the frozen :class:`NFLinear`
that LoRA adapts, bases quantized as they load (``nf4``, ``int8``), and merging adapters into quantized bases
(dequantize, merge, requantize). Importing this package registers
``NFLinear`` as a layer kind and the base loaders adapters trained on quantized bases use."""

from lorakit.quant.dequantize import dequantize_bases, dequantize_linears
from lorakit.quant.model_quantization import QuantizationSummary, quantize_model
from lorakit.quant.nf_config import NFConfig, bits_per_parameter
from lorakit.quant.nf_linear import NFLinear
from lorakit.quant.normal_float import code_book
from lorakit.quant.quantized_files import load_quantized, save_quantized
from lorakit.quant.quantized_loading import load_quantized_base
from lorakit.quant.quantized_tensor import NFTensor, quantize_nf
from lorakit.quant.requantize import RequantizationError, requantize

__all__ = ["NFConfig", "NFLinear", "NFTensor", "QuantizationSummary", "RequantizationError", "bits_per_parameter",
           "code_book", "dequantize_bases", "dequantize_linears", "load_quantized", "load_quantized_base",
           "quantize_model", "quantize_nf", "requantize", "save_quantized"]
