"""``lorakit export``: an adapter as a GGUF file for llama.cpp, merged into its base or alone as a LoRA file.

    lorakit export --format gguf --quant q8_0 --out model.gguf runs/r
    lorakit export --format gguf-lora --out adapter.gguf runs/r
"""

from __future__ import annotations

import argparse

from lorakit.cli.common import command
from lorakit.errors import ConfigError
from lorakit.io.gguf_tensors import QUANTIZATIONS
from lorakit.jobs.export_gguf import export_lora_gguf, export_merged_gguf

FORMATS = {"gguf": "the base with the adapter merged, one model file",
           "gguf-lora": "the adapter alone, a LoRA file for llama.cpp's --lora (float32)"}


def _export(args: argparse.Namespace) -> None:
    if args.format == "gguf-lora":
        if args.quant is not None:
            raise ConfigError("--quant applies to --format gguf; a GGUF LoRA file is written in float32")
        print(export_lora_gguf(args.adapter, args.out, base=args.base, force=args.force))
    else:
        print(export_merged_gguf(args.adapter, args.out, base=args.base, quant=args.quant or "f16", force=args.force))


def register(commands) -> None:
    export = command(commands, "export", _export, "Write an adapter as a GGUF file for llama.cpp.", base="recorded")
    export.add_argument("adapter", help="an adapter directory (PEFT format)")
    export.add_argument("--format", required=True, choices=list(FORMATS),
                        help="; ".join(f"{name}: {text}" for name, text in FORMATS.items()))
    export.add_argument("--out", required=True, help="the GGUF file to write")
    export.add_argument("--quant", default=None, choices=list(QUANTIZATIONS),
                        help="--format gguf: how matrices are stored (default: f16; norms stay float32, matrices "
                             "whose rows do not split into 32-value blocks float16)")
    export.add_argument("--force", action="store_true", help="replace --out if it exists")
