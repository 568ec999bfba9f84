"""Formatting tasks: rewriting a date as ISO 8601, and sorting a list of numbers."""

from __future__ import annotations

import calendar
import random

from lorakit.data.tasks.base import Task, normalise_answer

#: English month names, spelled out here because ``calendar.month_name`` follows the locale.
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")


def _date(generator: random.Random) -> tuple[str, str]:
    """A date between 1800 and 2199 written like ``March 5, 2021``; the answer is ``2021-03-05``."""
    year, month = generator.randint(1800, 2199), generator.randint(1, 12)
    day = generator.randint(1, calendar.monthrange(year, month)[1])
    written = f"{MONTHS[month - 1]} {day}, {year}"
    return f"Write this date in the format YYYY-MM-DD: {written}", f"{year:04d}-{month:02d}-{day:02d}"


def _sort(generator: random.Random) -> tuple[str, str]:
    """3 or 4 distinct numbers below 100; the answer lists them in ascending order."""
    numbers = generator.sample(range(100), generator.randint(3, 4))
    listed = ", ".join(map(str, numbers))
    return f"Sort these numbers in ascending order: {listed}", ", ".join(map(str, sorted(numbers)))


def normalise_list(text: str) -> str:
    """The default normalisation, then without spaces: ``"3, 7"`` and ``"3,7"`` are the same list."""
    return "".join(normalise_answer(text).split())


DATE = Task(name="date", description="Rewrite a written-out date as YYYY-MM-DD.", generate=_date)
SORT = Task(
    name="sort",
    description="Sort 3 or 4 numbers ascending, comma-separated.",
    generate=_sort,
    normalise=normalise_list,
)
