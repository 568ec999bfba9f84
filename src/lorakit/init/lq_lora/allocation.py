"""LQ-LoRA's bit allocation: one quantizer configuration per matrix under a bit budget (Guo et al., ICLR 2024,
Sec. 3.2), as the 0/1 integer linear program

    minimise    sum_i sum_c cost_ic x_ic
    subject to  sum_c x_ic = 1                                   for every matrix i
                sum_i sum_c bits_c numel_i x_ic <= budget sum_i numel_i
                x_ic in {0, 1}

where ``cost_ic`` is matrix i's squared (Fisher-weighted) decomposition error under config c and
``bits_c`` its bits per parameter (codes and both levels of scales). Solved with ``scipy.optimize.milp``
(HiGHS), which proves the optimum.

With ``chunks`` > 1 (:func:`allocate_in_chunks`, the paper's option for large models) the matrices, in order,
are cut into that many consecutive groups and each group gets its own program under the same budget per
parameter: smaller programs, each group within the budget (so the whole is), at a total cost no lower than the
single program's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from lorakit.errors import ConfigError

RELATIVE_SLACK = 1e-9
"""The budget is widened by this fraction so that a config costing exactly the budget fits despite rounding."""


def minimum_budget(bits: Sequence[float]) -> float:
    """The smallest feasible budget in bits per parameter: every matrix at the cheapest config (a config's
    cost per parameter is the same for every matrix)."""
    return min(bits)


def allocate(costs: Sequence[Sequence[float]], bits: Sequence[float], numels: Sequence[int],
             budget: float) -> list[int]:
    """The config index chosen for each matrix: ``costs`` (matrices, configs), ``bits`` (configs,) bits
    per parameter, ``numels`` (matrices,), ``budget`` in bits per parameter over all matrices.

    A budget below :func:`minimum_budget` raises a :class:`ConfigError` naming that minimum."""
    cost = np.asarray(costs, dtype=np.float64)  # (matrices, configs)
    per_parameter = np.asarray(bits, dtype=np.float64)  # (configs,)
    sizes = np.asarray(numels, dtype=np.float64)  # (matrices,)
    matrices, configs = cost.shape
    if per_parameter.shape != (configs,) or sizes.shape != (matrices,):
        raise ConfigError(f"allocate: costs are {cost.shape}, but there are {per_parameter.size} config costs and "
                          f"{sizes.size} matrix sizes")
    lowest = minimum_budget(bits)
    if budget < lowest * (1 - RELATIVE_SLACK):
        raise ConfigError(f"a budget of {budget:g} bits per parameter is infeasible: the cheapest configuration "
                          f"costs {lowest:.4g}, the minimum feasible budget")
    one_each = np.kron(np.eye(matrices), np.ones(configs))  # (matrices, matrices * configs)
    storage = np.outer(sizes, per_parameter).reshape(1, -1)  # (1, matrices * configs), bits
    limit = budget * sizes.sum() * (1 + RELATIVE_SLACK)
    result = milp(cost.reshape(-1), integrality=np.ones(cost.size), bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(storage, -np.inf, limit)])
    if result.x is None:
        raise ConfigError(f"the bit allocation found no solution at {budget:g} bits per parameter ({result.message})")
    return [int(index) for index in result.x.reshape(matrices, configs).argmax(axis=1)]


def check_chunks(chunks: int, matrices: int) -> None:
    """Refuse a chunk count that is not a positive integer or exceeds the number of ``matrices``."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ConfigError(f"bit_chunks is {chunks!r}; a positive integer is required")
    if chunks > matrices:
        raise ConfigError(f"bit_chunks is {chunks}, but the adapter has {matrices} matrices to allocate bits over; "
                          f"use at most {matrices}")


def allocate_in_chunks(costs: Sequence[Sequence[float]], bits: Sequence[float], numels: Sequence[int],
                       budget: float, chunks: int) -> list[int]:
    """:func:`allocate` over ``chunks`` consecutive groups of the matrices (as equal in count as they can be),
    each within ``budget`` bits per parameter of its own parameters; ``chunks`` 1 is :func:`allocate` itself."""
    matrices = len(numels)
    check_chunks(chunks, matrices)
    chosen: list[int] = []
    for group in np.array_split(np.arange(matrices), chunks):
        first, last = int(group[0]), int(group[-1]) + 1
        chosen += allocate(costs[first:last], bits, numels[first:last], budget)
    return chosen
