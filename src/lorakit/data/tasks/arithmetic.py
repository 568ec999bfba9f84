"""Number tasks: multi-digit addition, and metric unit conversion by a power of ten."""

from __future__ import annotations

import random

from lorakit.data.tasks.base import Task

#: (unit, the unit to convert to, in words): each conversion multiplies by 1000.
UNITS = (("km", "metres"), ("kg", "grams"), ("L", "millilitres"))


def _add(generator: random.Random) -> tuple[str, str]:
    """Two numbers of 2 to 4 digits; the answer is their sum."""
    a, b = generator.randint(10, 9999), generator.randint(10, 9999)
    return f"Add the two numbers: {a} + {b}", str(a + b)


def _units(generator: random.Random) -> tuple[str, str]:
    """A quantity with up to three decimals in km, kg or L; the answer is a whole number."""
    unit, target = generator.choice(UNITS)
    thousandths = generator.randint(1, 99_999)  # 0.001 to 99.999
    whole, fraction = divmod(thousandths, 1000)
    quantity = f"{whole}.{fraction:03d}".rstrip("0").rstrip(".")
    return f"Convert to {target}: {quantity} {unit}", str(thousandths)


ADD = Task(name="add", description="Add two numbers of 2 to 4 digits.", generate=_add)
UNITS_TASK = Task(
    name="units",
    description="Convert a quantity in km, kg or L to metres, grams or millilitres (a whole number).",
    generate=_units,
)
