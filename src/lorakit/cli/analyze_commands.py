"""``lorakit analyze``: what an adapter (or a full fine-tune) changed; see :mod:`lorakit.analysis`.

    lorakit analyze runs/date                                   # -> runs/date-analysis/
    lorakit analyze runs/date --against runs/caps --out runs/date-vs-caps
    lorakit analyze runs/full-ft --out runs/full-analysis       # a model directory: ΔW = W_t - W_0
    lorakit analyze runs/date --mitigate 0.75 --mitigated-out runs/date-mitigated
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorakit.analysis import IntruderSettings, analyze, mitigate_intruders, write_report
from lorakit.analysis.intruders import EPSILON, EPSILONS, TOP_K
from lorakit.cli.common import command
from lorakit.errors import ConfigError
from lorakit.models import load_model


def _epsilons(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"--epsilons {text!r}: comma-separated numbers are required (e.g. 0.3,0.5,0.7)") from None


def _cmd_analyze(args: argparse.Namespace) -> None:
    if (args.mitigate is None) != (args.mitigated_out is None):
        raise ConfigError("--mitigate LAMBDA and --mitigated-out DIR go together")
    settings = IntruderSettings(top_k=args.top_k, epsilon=args.epsilon, epsilons=_epsilons(args.epsilons))
    base_model = load_model(args.base)[0]
    report = analyze(args.path, base=base_model, against=args.against, intruders=settings,
                     overlap_rank=args.overlap_rank, progress=not args.quiet)
    report["base"] = args.base
    out = write_report(report, args.out or Path(str(args.path).rstrip("/") + "-analysis"))
    summary = {"report": str(out), **{k: report["totals"][k] for k in ("modules", "intruders", "norm")}}
    if report["against"]:
        summary["overlap"] = {k: report["against"][k] for k in ("mean_left", "mean_right")}
    if args.mitigate is not None:
        mitigated = mitigate_intruders(args.path, args.mitigated_out, base=base_model, scale=args.mitigate,
                                       intruders=settings, overwrite=args.overwrite, progress=not args.quiet)
        after = analyze(mitigated.out, base=base_model, intruders=settings, progress=not args.quiet)
        summary["mitigated"] = {**mitigated.summary(), "intruders_after": after["totals"]["intruders"]}
    print(json.dumps(summary, indent=2))


def register(commands) -> None:
    analyze = command(commands, "analyze", _cmd_analyze,
                      "Spectra, intruder dimensions and subspace overlap of an adapter or a fine-tuned model.")
    analyze.add_argument("path", help="an adapter directory, or a fine-tuned model directory (full fine-tuning)")
    analyze.add_argument("--against", default=None, help="another adapter or model: overlap of the updates' subspaces")
    analyze.add_argument("--out", default=None, help="report directory (default: PATH-analysis)")
    analyze.add_argument("--top-k", type=int, default=TOP_K,
                         help=f"singular vectors scanned per matrix (default {TOP_K})")
    analyze.add_argument("--epsilon", type=float, default=EPSILON,
                         help=f"intruder cosine threshold (default {EPSILON})")
    analyze.add_argument("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS),
                         help="the ε sweep, comma-separated")
    analyze.add_argument("--overlap-rank", type=int, default=None,
                         help="directions compared by --against (default: the smaller adapter rank, else 16)")
    analyze.add_argument("--mitigate", type=float, default=None, metavar="LAMBDA",
                         help="also write the adapter with its intruder directions scaled by LAMBDA (PEFT: 0.75)")
    analyze.add_argument("--mitigated-out", default=None, help="where the mitigated adapter goes")
    analyze.add_argument("--overwrite", action="store_true", help="allow --mitigated-out to be non-empty")
    analyze.add_argument("--quiet", action="store_true")
