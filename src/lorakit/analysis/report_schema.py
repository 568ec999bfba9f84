"""The layout of ``lorakit analyze``'s JSON report (``analysis.json``), and its check.

Every report names :data:`SCHEMA_NAME`; :data:`SCHEMA` lists each object's keys and value types (a
nested dict is an object, a one-element list is a list of that). ``check_report`` raises
:class:`FormatError` naming the first path that does not fit, so tools that read reports can rely on it.
"""

from __future__ import annotations

from typing import Any

from lorakit.errors import FormatError

SCHEMA_NAME = "lorakit.analysis/1"
_NUMBER = (int, float)
_MODULE = {"module": str, "shape": [int], "norm": _NUMBER, "relative_norm": _NUMBER, "effective_rank": _NUMBER,
           "rank": int, "singular_values": [_NUMBER], "max_cosines": [_NUMBER], "intruders": int}
SCHEMA: dict[str, Any] = {
    "schema": str,
    "subject": {"path": str, "kind": str},
    "base": (str, type(None)),
    "settings": {"top_k": int, "epsilon": _NUMBER, "epsilons": [_NUMBER]},
    "modules": [_MODULE],
    "skipped": [{"module": str, "reason": str}],
    "totals": {"modules": int, "intruders": int, "intruders_by_epsilon": [{"epsilon": _NUMBER, "intruders": int}],
               "norm": _NUMBER, "mean_effective_rank": _NUMBER},
    "against": (type(None), {"path": str, "kind": str, "rank": int, "mean_left": _NUMBER, "mean_right": _NUMBER,
                             "modules": [{"module": str, "left": _NUMBER, "right": _NUMBER}]}),
}


def check_report(report: Any) -> None:
    """Raise :class:`FormatError` unless ``report`` fits :data:`SCHEMA` and names :data:`SCHEMA_NAME`."""
    _check(report, SCHEMA, "report")
    if report["schema"] != SCHEMA_NAME:
        raise FormatError(f"report.schema is {report['schema']!r}; {SCHEMA_NAME!r} is required")


def _check(value: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            raise FormatError(f"{where} is {type(value).__name__}; an object is required")
        missing = sorted(set(expected) - set(value))
        if missing:
            raise FormatError(f"{where} lacks {', '.join(missing)}")
        for key, inner in expected.items():
            _check(value[key], inner, f"{where}.{key}")
    elif isinstance(expected, list):
        if not isinstance(value, list):
            raise FormatError(f"{where} is {type(value).__name__}; a list is required")
        for index, item in enumerate(value):
            _check(item, expected[0], f"{where}[{index}]")
    elif isinstance(expected, tuple) and any(isinstance(option, dict) for option in expected):
        if value is None and type(None) in expected:
            return
        _check(value, next(option for option in expected if isinstance(option, dict)), where)
    elif isinstance(value, bool) or not isinstance(value, expected):
        raise FormatError(f"{where} is {value!r}; {_names(expected)} is required")


def _names(expected: Any) -> str:
    options = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("null" if option is type(None) else option.__name__ for option in options)
