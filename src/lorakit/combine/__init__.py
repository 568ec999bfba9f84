"""Combining LoRA adapters into one PEFT-format adapter, exactly or with a reported error.

    from lorakit.combine import combine_adapters
    report = combine_adapters([("runs/a", 1.0), ("runs/b", -0.5)], "runs/a-minus-b", mode="cat")
    report = combine_adapters([("runs/a", 1.0), ("runs/b", 1.0)], "runs/ab-r8", mode="svd", rank=8)
    print(report.relative_error)          # ||Δ - Δ_k||_F / ||Δ||_F of the svd truncation

The combined adapter's update is ``Δ_m = Σ_i w_i s_i B_i A_i`` on every module ``m`` of any input
(``s_i`` each adapter's own scale, rsLoRA and patterns included): ``cat`` writes it exactly (ranks
add), ``svd`` truncated to a rank, ``linear`` as factor sums only where that is exact. The same thing
is ``lorakit combine --adapter runs/a --adapter runs/b=-0.5 --mode cat --out runs/c``.
"""

from lorakit.combine.combine import combine_adapters
from lorakit.combine.report import CombineReport

__all__ = ["CombineReport", "combine_adapters"]
