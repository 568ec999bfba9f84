"""Run the HTTP layer on uvicorn: start the engine, say when connections are accepted, stop on a signal.

On SIGINT or SIGTERM the server stops accepting connections and shuts the engine down at the same
time: requests in flight get ``grace`` seconds to finish, then end ``cancelled`` (a 503 or an error
event), their connections close, and :func:`serve` returns (the command exits 0). A second SIGINT
forces the exit.

Without an API key anyone who reaches the port can use the server, so it binds to a loopback address
only, unless the caller insists (``insecure_public``, ``--insecure-public``), which prints a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from lorakit.errors import ConfigError
from lorakit.serve.app import build_app
from lorakit.serve.server_metrics import ServerMetrics

READY = "lorakit serve: ready at {url}"
"""The line printed (and flushed) once the server accepts connections."""


def serve(engine, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          allow_runtime_loading: bool = False, adapter_root: Path | None = None, insecure_public: bool = False,
          metrics: ServerMetrics | None = None, grace: float = 10.0, log_level: str = "warning") -> None:
    """Serve ``engine`` (opened, not started) at ``http://host:port/v1`` until SIGINT or SIGTERM.

    ``port`` 0 picks a free port (the ready line names it). ``metrics``: those whose ``observer`` the
    engine was opened with. Raises :class:`ConfigError` for a public host without a key (unless
    ``insecure_public``) or a port it cannot listen on."""
    check_exposure(host, api_key, insecure_public)
    app = build_app(engine, api_key=api_key, allow_runtime_loading=allow_runtime_loading,
                    adapter_root=adapter_root, metrics=metrics)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=int(grace) + 5)
    server = EngineServer(config, engine, grace)
    engine.start()
    try:
        server.run()
    except SystemExit as stop:  # uvicorn's answer to a socket it cannot bind (it logged the reason)
        raise ConfigError(f"cannot serve at http://{_host(host)}:{port}: uvicorn stopped ({stop.code})") from None
    finally:
        server.stop_engine(grace=0.0)


def check_exposure(host: str, api_key: str | None, insecure_public: bool) -> None:
    """Refuse a non-loopback ``host`` without an API key, unless ``insecure_public`` (then warn)."""
    if api_key or is_loopback(host):
        return
    if not insecure_public:
        raise ConfigError(f"--host {host} is reachable from other machines and no API key is set: pass --api-key "
                          f"(or set LORAKIT_API_KEY), or --insecure-public to serve without one anyway")
    print(f"lorakit serve: warning: serving on {host} without an API key: anyone who reaches this port can use "
          f"the server and its adapters", file=sys.stderr, flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class EngineServer(uvicorn.Server):
    """uvicorn's server, which also prints the ready line, shuts the engine down with itself and takes
    SIGINT/SIGTERM as a request to stop (uvicorn's own handling re-raises them after stopping, which would
    end the process by the signal instead of exiting 0)."""

    def __init__(self, config: uvicorn.Config, engine, grace: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace = grace
        self._engine_stopped = threading.Event()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(READY.format(url=f"http://{_host(host)}:{port}/v1"), flush=True)

    async def shutdown(self, sockets=None) -> None:
        """Stop accepting, and let the engine finish (or cancel) what is in flight meanwhile."""
        stopping = asyncio.get_running_loop().run_in_executor(None, self.stop_engine, self.grace)
        await super().shutdown(sockets)
        await stopping

    def stop_engine(self, grace: float) -> None:
        """Shut the engine down once (later calls return at once)."""
        if not self._engine_stopped.is_set():
            self._engine_stopped.set()
            self.engine.shutdown(grace=grace)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
