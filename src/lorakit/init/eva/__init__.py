"""EVA (Paischer et al. 2024): activation PCA -> redistributed ranks -> init.

See :mod:`lorakit.init.eva.eva_init` for the two explicit steps.
"""

from lorakit.init.eva.estimate import EvaEstimate, EvaModule
from lorakit.init.eva.eva_init import estimate_eva, eva_config, init_eva

__all__ = ["EvaEstimate", "EvaModule", "estimate_eva", "eva_config", "init_eva"]
