"""L4Q (Jeon, Kim, Kim, "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large Language Models",
ACL'25, arXiv 2402.04902): LoRA trained inside a fake-quantized weight, ending as one integer-coded linear.

    W_q = Delta * (clamp(round((W0 + s B A) / Delta - z), Qn, Qp) + z)     per group of input columns

Importing this package registers the ``l4q-model`` directory kind and ``UniformQuantizedLinear``'s layer kind.
"""

from lorakit.quant.l4q.autograd import L4QMatmul, l4q_matmul
from lorakit.quant.l4q.config import L4QConfig
from lorakit.quant.l4q.fake_quant import minmax_init
from lorakit.quant.l4q.l4q_files import load_quantized_linears, quantized_linears_writer
from lorakit.quant.l4q.l4q_linear import L4QLinear
from lorakit.quant.l4q.l4q_model import attach_l4q, finalize_l4q, l4q_layers
from lorakit.quant.l4q.l4q_training import L4QTraining
from lorakit.quant.l4q.model_dir import L4Q_MODEL_KIND, save_l4q_model
from lorakit.quant.l4q.uniform_linear import UniformQuantizedLinear

__all__ = ["L4QConfig", "L4QLinear", "L4QMatmul", "L4QTraining", "L4Q_MODEL_KIND", "UniformQuantizedLinear",
           "attach_l4q", "finalize_l4q", "l4q_layers", "l4q_matmul", "load_quantized_linears", "minmax_init",
           "quantized_linears_writer", "save_l4q_model"]
