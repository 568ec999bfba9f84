"""``lorakit serve`` as a real subprocess on a free loopback port, for the tests to talk to over HTTP.

``--port 0`` lets the operating system pick a free port, and the ready line names it (no race between
finding a port and binding it). stdout and stderr go to files, so a chatty server never blocks on a full
pipe; every wait is bounded, and the server is stopped with SIGTERM (then killed) whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai

READY = re.compile(r"lorakit serve: ready at (http://\S+)/v1")
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


@dataclass
class Server:
    """A running server: its URL, its process and its logs."""

    url: str
    """``http://127.0.0.1:PORT`` (no trailing slash)."""
    process: subprocess.Popen
    logs: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, api_key: str | None = None, **options) -> openai.OpenAI:
        """The real ``openai`` client on this server (no retries, so a 429 is seen as one)."""
        return openai.OpenAI(base_url=self.base_url, api_key=api_key or self.api_key or "none", max_retries=0,
                             **{"timeout": 60.0, **options})

    def async_client(self, **options) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0,
                                  **{"timeout": 60.0, **options})

    def http(self, method: str, path: str, body: bytes | dict | None = None, *, api_key: str | None = "",
             timeout: float = 60.0) -> tuple[int, dict, dict | str]:
        """One raw request: ``(status, headers (lower-case names), body as JSON or text)``; ``api_key=""`` sends
        this server's key, None none at all."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        key = self.api_key if api_key == "" else api_key
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, headers, raw = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            status, headers, raw = error.code, error.headers, error.read()
        headers, text = {name.lower(): value for name, value in headers.items()}, raw.decode("utf-8")
        try:
            return status, headers, json.loads(text)
        except json.JSONDecodeError:
            return status, headers, text

    def rss_mib(self) -> float:
        """The server's resident memory (VmRSS of /proc/PID/status) in MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def log_text(self) -> str:
        return self.logs.read_text(errors="replace")[-6000:]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit code (killed after :data:`STOP_TIMEOUT_S`, which fails the caller)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT_S)
            raise AssertionError(f"the server did not stop within {STOP_TIMEOUT_S} s of {sig!r}:\n"
                                 f"{self.log_text()}") from None


@contextlib.contextmanager
def running_server(base_dir: Path, *args: str, api_key: str | None = None,
                   env: dict[str, str] | None = None) -> Iterator[Server]:
    """``python -m lorakit serve --base BASE_DIR --port 0 [--api-key KEY] ARGS...``, ready; stopped afterwards,
    and it must then exit 0 (SIGTERM is a clean stop)."""
    workdir = Path(tempfile.mkdtemp(prefix="lorakit-serve-"))
    out, logs = workdir / "stdout.txt", workdir / "stderr.txt"
    command = [sys.executable, "-m", "lorakit", "serve", "--base", str(base_dir), "--port", "0", *args]
    if api_key is not None:
        command += ["--api-key", api_key]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(env or {})}
    with out.open("wb") as stdout, logs.open("wb") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=environment, cwd=workdir)
    server = Server(url="", process=process, logs=logs, api_key=api_key)
    try:
        server.url = _wait_until_ready(server, out)
        yield server
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    code = server.stop()
    assert code == 0, f"the server exited {code} on SIGTERM, not 0:\n{server.log_text()}"


def _wait_until_ready(server: Server, out: Path) -> str:
    """The URL of the ready line, once ``/health`` answers too."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"the server exited {server.process.returncode} before it was ready:\n"
                                 f"{server.log_text()}")
        found = READY.search(out.read_text(errors="replace"))
        if found:
            server.url = found.group(1)
            status, _, body = server.http("GET", "/health", api_key=None, timeout=5.0)
            assert (status, body) == (200, {"status": "ok"}), (status, body)
            return server.url
        time.sleep(0.1)
    raise AssertionError(f"the server was not ready within {START_TIMEOUT_S} s:\n{server.log_text()}")
