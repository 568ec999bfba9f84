"""``lorakit serve``: the base model, adapters and mixtures behind one OpenAI-compatible HTTP endpoint.

    lorakit serve --adapter dates=runs/dates --adapter mix=runs/xlora --port 8000
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "dates", "prompt": "Date: 3 May 2021 ->", "max_tokens": 12, "temperature": 0}'

docs/SERVING.md describes every endpoint, the extensions and the limits.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lorakit.cli.common import command
from lorakit.cli.values import named_values, optional
from lorakit.errors import ConfigError
from lorakit.quant.base_schemes import SCHEMES
from lorakit.serve.cards import RegistrationError
from lorakit.serve.engine import Engine
from lorakit.serve.residency import recorded_quantization
from lorakit.serve.server import check_exposure, serve
from lorakit.serve.server_metrics import ServerMetrics

API_KEY_VARIABLE = "LORAKIT_API_KEY"


def _serve(args: argparse.Namespace) -> None:
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    check_exposure(args.host, api_key, args.insecure_public)  # before minutes of loading, not after
    adapters = named_values(args.adapter, "--adapter")
    adapter_root = _adapter_root(args.adapter_root, args.allow_runtime_loading)
    metrics = ServerMetrics()
    engine = Engine.open(args.base, quantize=_base_quantization(adapters), max_batch=args.max_batch,
                         max_queue=args.max_queue,
                         max_resident_adapters=args.max_resident_adapters, request_timeout=args.request_timeout,
                         observer=metrics.observer)
    for name, path in adapters.items():
        try:
            engine.register(name, path)
        except RegistrationError as error:
            raise ConfigError(f"--adapter {name}={path}: {error}") from None
    serve(engine, host=args.host, port=args.port, api_key=api_key, allow_runtime_loading=args.allow_runtime_loading,
          adapter_root=adapter_root, insecure_public=args.insecure_public, metrics=metrics)


def _base_quantization(adapters: dict[str, str]) -> str | None:
    """The quantization the startup adapters record, which the base is loaded with; they must agree."""
    recorded = {name: recorded_quantization(Path(path)) for name, path in adapters.items()}
    schemes = set(recorded.values())
    if len(schemes) > 1:
        found = ", ".join(f"{name}: {scheme or 'full precision'}" for name, scheme in recorded.items())
        raise ConfigError(f"the --adapter directories were trained on differently quantized bases ({found}); one "
                          "server serves one base: start one server per base")
    scheme = next(iter(schemes), None)
    if scheme is not None and scheme not in SCHEMES:
        raise ConfigError(f"the --adapter directories were trained on a {scheme} base, which lorakit cannot "
                          f"rebuild (it quantizes bases as {', '.join(SCHEMES)})")
    return scheme


def _adapter_root(root: str | None, allow_runtime_loading: bool) -> Path | None:
    if root is None:
        if allow_runtime_loading:
            raise ConfigError("--allow-runtime-loading needs --adapter-root DIR: the directory that loaded "
                              "adapters must sit under")
        return None
    path = Path(root)
    if not path.is_dir():
        raise ConfigError(f"--adapter-root {root!r} is not a directory")
    return path


def register(commands) -> None:
    serve_command = command(commands, "serve", _serve,
                            "Serve the base model, adapters and mixtures with the OpenAI API (completions, chat).")
    serve_command.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                               help="serve the directory DIR (an adapter or a mixture) as model NAME; repeatable")
    serve_command.add_argument("--host", default="127.0.0.1",
                               help="address to listen on (default: %(default)s; another one needs --api-key)")
    serve_command.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0: a free one)")
    serve_command.add_argument("--api-key", default=None,
                               help=f"require 'Authorization: Bearer KEY' on every endpoint but /health "
                                    f"(default: ${API_KEY_VARIABLE}, else none)")
    serve_command.add_argument("--insecure-public", action="store_true",
                               help="allow a non-loopback --host without an API key")
    serve_command.add_argument("--max-batch", type=int, default=32,
                               help="sequences decoded together (default: %(default)s)")
    serve_command.add_argument("--max-queue", type=int, default=256,
                               help="requests waiting before new ones get 429 (default: %(default)s)")
    serve_command.add_argument("--max-resident-adapters", type=int, default=8,
                               help="adapters kept in memory; the others are loaded on demand (default: %(default)s)")
    serve_command.add_argument("--request-timeout", type=optional(float), default=600.0, metavar="S",
                               help="seconds a request may take, queued and generating; none: no limit "
                                    "(default: %(default)s)")
    serve_command.add_argument("--allow-runtime-loading", action="store_true",
                               help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    serve_command.add_argument("--adapter-root", default=None, metavar="DIR",
                               help="the directory runtime-loaded adapters must be inside (required with "
                                    "--allow-runtime-loading)")
