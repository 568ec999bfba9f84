"""How LoRA training time and memory grow with rank, sequence length and attached adapters: lorakit vs
peft on the default model, same run.

Starting from all-linear, r = 16, batch ``--batch`` x length 128, random all-supervised tokens,
dropout 0, one trained adapter, one axis varies at a time: rank 1..256, length 64..1024, and the
number of attached adapters (one of them trained, the others inactive) 1..8. Every point is
:func:`train_throughput.measure` in its own process (peak RSS is that run's alone), peft and lorakit
back to back. Prints JSON lines and a final table in Markdown; results in
``docs/results/performance.md``.

    .venv/bin/python benchmarks/train_scaling.py [--steps 2] [--batch 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from train_throughput import LIBRARIES, Setting, run_child

AXES = {"rank": (1, 4, 16, 64, 256), "length": (64, 128, 256, 512, 1024), "adapters": (1, 2, 4, 8)}


def table(rows: list[dict]) -> str:
    """The results as a Markdown table: one line per point, both libraries and the ratios."""
    lines = ["| axis | value | peft s/step | lorakit s/step | time lorakit/peft | peft / lorakit share of matmul peak "
             "| peft peak MiB | lorakit peak MiB | memory lorakit/peft |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        peft, ours = row["peft"], row["lorakit"]
        lines.append(f"| {row['axis']} | {row['value']} "
                     f"| {peft['seconds_per_step']:.2f} | {ours['seconds_per_step']:.2f} "
                     f"| {ours['seconds_per_step'] / peft['seconds_per_step']:.2f} "
                     f"| {peft['fraction_of_matmul_peak']:.0%} / {ours['fraction_of_matmul_peak']:.0%} "
                     f"| {peft['peak_rss_mib']:.0f} | {ours['peak_rss_mib']:.0f} "
                     f"| {ours['peak_rss_mib'] / peft['peak_rss_mib']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    start = Setting(batch=args.batch)
    rows = []
    for axis, values in AXES.items():
        for value in values:
            setting = dataclasses.replace(start, **{axis: value})
            row = {"axis": axis, "value": value}
            for library in LIBRARIES:
                row[library] = run_child(library, args.steps, setting)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
