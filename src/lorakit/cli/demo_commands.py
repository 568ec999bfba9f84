"""``lorakit demo [lora|xlora|mixtures|intruders]``: each demo's flags are its settings' fields, with its own
defaults, so a demo is offered exactly what it honours (see :mod:`lorakit.demos`).

    lorakit demo                                     # = lorakit demo lora
    lorakit demo lora --task caps --steps 40
    lorakit demo xlora --out runs/xlora-demo --test-n 20
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from functools import partial

from lorakit.cli.common import command, command_group
from lorakit.cli.flags import ConfigFlags
from lorakit.demos.default_demo import LoraDemo, run_demo
from lorakit.demos.intruders_demo import IntrudersDemo, run_intruders_demo
from lorakit.demos.mixtures_demo import MixturesDemo, run_mixtures_demo
from lorakit.demos.xlora_demo import XLoraDemo, run_xlora_demo

DEMOS: dict[str, tuple[type, Callable]] = {
    "lora": (LoraDemo, run_demo),
    "xlora": (XLoraDemo, run_xlora_demo),
    "mixtures": (MixturesDemo, run_mixtures_demo),
    "intruders": (IntrudersDemo, run_intruders_demo),
}
DEFAULT_DEMO = "lora"


def _run(run: Callable, flags: ConfigFlags, args: argparse.Namespace) -> None:
    run(flags.build(args))


def register(commands) -> None:
    demos = command_group(commands, "demo", f"Run a demo on the real default model ({DEFAULT_DEMO} unless named).")
    for name, (settings, run) in DEMOS.items():
        flags = ConfigFlags(settings)
        command(demos, name, partial(_run, run, flags), settings.__doc__.split("\n")[0], base=False, configs=(flags,))


def with_default_demo(argv: Sequence[str]) -> list[str]:
    """``argv`` with the default demo's name inserted after a bare ``demo`` (``lorakit demo --steps 20``)."""
    argv = list(argv)
    if argv[:1] == ["demo"] and (len(argv) == 1 or argv[1] not in (*DEMOS, "-h", "--help")):
        return ["demo", DEFAULT_DEMO, *argv[1:]]
    return argv
