"""The serving engine: one thread running the continuous batch, and the thread-safe door to it.

HTTP handlers call :meth:`Engine.submit` on the event loop (validation and a bounded queue: a full
queue raises :class:`~lorakit.serve.requests.QueueFull`, never a silent drop), and read the events
of the returned handle. The engine's thread owns the model: it runs :class:`~.scheduler.Scheduler`
iterations, and anything that changes the model (loading an adapter, installing a mixture) is handed
to it as a job run between iterations, so a forward never sees a half-loaded adapter.

Names: the base is served under its ``--base`` name; plain adapter directories under the names they
are registered with (:mod:`.residency`: versions, LRU residency); X-LoRA, MixLoRA and MeteoRA
directories each get a lane with their own copy of the base (:mod:`.lanes`). A whole-model directory
is refused (serve it as the base).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from lorakit.errors import ConfigError, LorakitError
from lorakit.eval.generate import stop_token_ids
from lorakit.io.directory_kinds import directory_kind
from lorakit.io.loader import load
from lorakit.models import DEFAULT_MODEL
from lorakit.quant.quantized_loading import load_base
from lorakit.serve.cards import BASE_KIND, AdapterBusy, ModelCard, RegistrationError, UnknownModel
from lorakit.serve.lanes import Lane, mixture_experts
from lorakit.serve.observer import EngineObserver
from lorakit.serve.requests import GenerationRequest, QueueFull, RequestError, RequestHandle
from lorakit.serve.residency import Residency
from lorakit.serve.scheduler import Scheduler
from lorakit.serve.servable import servable_directory

LOG = logging.getLogger("lorakit.serve")
T = TypeVar("T")

MIXTURE_KINDS = ("xlora", "mixlora", "meteora")
IDLE_WAIT_S = 0.5


class Engine:
    """A base model, the adapters and mixtures served on it, and the thread that generates."""

    def __init__(self, model: nn.Module, tokenizer, *, base_name: str, base_source: str, max_batch: int = 32,
                 max_queue: int = 256, max_resident_adapters: int = 8, request_timeout: float | None = 600.0,
                 observer: EngineObserver | None = None, base_quantization: str | None = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ConfigError(f"max_batch={max_batch} must be at least 1 and max_queue={max_queue} at least 0")
        if request_timeout is not None and not request_timeout > 0:
            raise ConfigError(f"request_timeout={request_timeout} must be positive (or None: no timeout)")
        self.base_name = base_name
        self.base_source = base_source
        self.tokenizer = tokenizer
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.observer = observer or EngineObserver()
        self.created = int(time.time())
        self.base_quantization = base_quantization
        self.residency = Residency(model, base_name, max_resident_adapters, base_quantization)
        self.mixture_cards: dict[str, ModelCard] = {}
        self.scheduler = Scheduler(self.residency, Lane(base_name, model, self.context_length), tokenizer,
                                   set(stop_token_ids(model, tokenizer)), max_batch=max_batch,
                                   request_timeout=request_timeout, observer=self.observer)
        self._lock = threading.Condition()
        self._jobs: list[tuple[Callable[[], Any], Future]] = []
        self._incoming: list[RequestHandle] = []
        """Submitted requests, moved into the scheduler's queue by the engine's thread."""
        self._unloading: set[str] = set()
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stopping = False

    @classmethod
    def open(cls, base: str | None = None, *, quantize: str | None = None, **options: Any) -> Engine:
        """An engine on the base model ``base`` (None: the default model), loaded here, quantized as it loads
        under the scheme ``quantize`` names (None: full precision)."""
        source = base or DEFAULT_MODEL
        model, tokenizer = load_base(source, quantize)
        return cls(model, tokenizer, base_name=source, base_source=source, base_quantization=quantize, **options)

    # -- what is served ------------------------------------------------------------------------------

    def cards(self) -> list[ModelCard]:
        """The base, every served adapter (current version) and every mixture."""
        base = ModelCard(self.base_name, BASE_KIND, None, None, self.created)
        adapters = [v.card for v in list(self.residency.current.values())]
        return [base, *adapters, *list(self.mixture_cards.values())]

    def served_names(self) -> list[str]:
        return [card.id for card in self.cards()]

    def register(self, name: str, path: str | Path, *, root: Path | None = None) -> ModelCard:
        """Serve the directory at ``path`` as ``name`` (a reload if ``name`` is served); blocking, any thread.

        With ``root``, ``path`` must lie inside it (:func:`~lorakit.serve.servable.servable_directory`)."""
        if not isinstance(name, str) or not name.strip():
            raise RegistrationError(f"an adapter needs a name; got {name!r}")
        if name == self.base_name:
            raise RegistrationError(f"{name!r} is the base model's name; register the directory under another")
        directory = servable_directory(path, root)
        try:
            kind = directory_kind(directory).name
        except LorakitError as error:
            raise RegistrationError(f"{directory} cannot be served: {error}") from None
        if kind == "adapter":
            version = self._on_thread(lambda: self._register_adapter(name, directory))
            return version.card
        if kind not in MIXTURE_KINDS:
            advice = "; serve a whole model as --base instead" if kind == "model" else ""
            raise RegistrationError(f"{directory} holds a directory of kind {kind!r}, which the engine cannot "
                                    f"serve next to the base{advice}")
        lane = self._mixture_lane(name, directory)
        card = ModelCard(name, kind, self.base_name, str(directory), int(time.time()))
        self._on_thread(lambda: self._install_lane(name, lane, card))
        return card

    def _register_adapter(self, name: str, directory: Path):
        if name in self.mixture_cards:
            self._retire_lane(name)
        return self.residency.register(name, directory)

    def _mixture_lane(self, name: str, directory: Path) -> Lane:
        """The mixture at ``directory`` on its own copy of the base, in a lane of its own."""
        base, _ = load_base(self.base_source, self.base_quantization)
        base.to(self.scheduler.shared.device)
        try:
            loaded = load(directory, base)
        except LorakitError as error:
            raise RegistrationError(f"{directory} cannot be served as {name!r}: {error}") from None
        return Lane(name, loaded.model.eval(), self.context_length, experts=mixture_experts(loaded))

    def _install_lane(self, name: str, lane: Lane, card: ModelCard) -> None:
        if name in self.residency.current:
            self.residency.unregister(name)
        self._retire_lane(name)
        self.scheduler.lanes[name] = lane
        self.mixture_cards[name] = card

    def _retire_lane(self, name: str) -> None:
        old = self.scheduler.lanes.pop(name, None)
        self.mixture_cards.pop(name, None)
        if old is not None and old.sequences:
            self.scheduler.retired.append(old)

    def unload(self, name: str, *, wait: float = 30.0) -> None:
        """Stop serving ``name``: new requests for it are refused at once; waits up to ``wait`` s for the
        requests using it, then unloads it, or (still in use) keeps serving it and raises AdapterBusy."""
        if name not in self.residency.current and name not in self.mixture_cards:
            raise UnknownModel(name, self.served_names(), field="lora_name")
        with self._lock:
            self._unloading.add(name)
        try:
            deadline = time.monotonic() + wait
            users = self._on_thread(lambda: self.scheduler.users(name))
            while users and time.monotonic() < deadline:
                time.sleep(0.05)
                users = self._on_thread(lambda: self.scheduler.users(name))
            if users:
                raise AdapterBusy(f"{name!r} is still used by {users} requests after {wait:g} s; it stays served")
            self._on_thread(lambda: self._unregister(name))
        finally:
            with self._lock:
                self._unloading.discard(name)

    def _unregister(self, name: str) -> None:
        if name in self.residency.current:
            self.residency.unregister(name)
        self._retire_lane(name)

    # -- requests --------------------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting) + len(self._incoming)

    @property
    def running(self) -> int:
        return self.scheduler.rows

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue ``request``; its handle streams the events. Raises RequestError for what no engine state could
        serve, and QueueFull when ``max_queue`` requests already wait. Call it on the event loop."""
        self._check(request)
        handle = RequestHandle(request, loop or asyncio.get_running_loop())
        with self._lock:
            if not self._accepting:
                raise RequestError("model", "the server is shutting down", status=503)
            depth = self.queue_depth
            if depth >= self.max_queue:
                raise QueueFull(depth)
            self._incoming.append(handle)
            self.observer.queued(depth + 1)
            self._lock.notify()
        return handle

    def _check(self, request: GenerationRequest) -> None:
        """Refuse a request no state of the engine could serve, naming the field."""
        served = self.served_names()
        if request.model not in served:
            raise UnknownModel(request.model, served)
        if request.model in self._unloading:
            raise RequestError("model", f"{request.model!r} is being unloaded", status=409)
        if request.adapters:
            if request.model != self.base_name:
                raise RequestError("adapters", f"a combination runs on the base model {self.base_name!r}, not on "
                                               f"{request.model!r}; send model={self.base_name!r}")
            for name, weight in request.adapters.items():
                if name not in self.residency.current:
                    raise UnknownModel(name, list(self.residency.current), field=f"adapters.{name}")
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                    raise RequestError(f"adapters.{name}", f"weight {weight!r} is not a finite number")
        if request.return_routing and request.model not in self.mixture_cards:
            raise RequestError("return_routing", f"{request.model!r} is not a mixture; only X-LoRA, MixLoRA and "
                                                 "MeteoRA route per token")
        self._check_sizes(request)

    def _check_sizes(self, request: GenerationRequest) -> None:
        prompt, context = len(request.prompt_ids), self.context_length
        if prompt == 0:
            raise RequestError("prompt", "is empty: a prompt needs at least one token")
        if prompt >= context:
            raise RequestError("prompt", f"has {prompt} tokens; the model's context is {context}")
        if request.max_tokens < (0 if request.echo else 1) or prompt + request.max_tokens > context:
            raise RequestError("max_tokens", f"{request.max_tokens} is out of range: at least "
                                             f"{0 if request.echo else 1}, and the prompt's {prompt} tokens "
                                             f"plus max_tokens at most the context of {context}")
        if not 1 <= request.n <= self.max_batch:
            raise RequestError("n", f"{request.n} is out of range 1..{self.max_batch} (the server's --max-batch)")
        vocab = len(self.tokenizer)
        if any(not 0 <= token < vocab for token in request.prompt_ids):
            raise RequestError("prompt", f"holds token ids outside the vocabulary 0..{vocab - 1}")

    # -- the thread ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start generating on a thread of the engine's own."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lorakit-engine", daemon=True)
            self._thread.start()

    def shutdown(self, grace: float = 10.0) -> None:
        """Refuse new requests, let running ones finish for up to ``grace`` s, cancel the rest, stop."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + grace
        while self._thread is not None and (self.scheduler.busy() or self._incoming) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._on_thread(self._cancel_all)
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _cancel_all(self) -> None:
        for handle in [*self.scheduler.waiting, *(a.handle for a in self.scheduler.running.values())]:
            handle.cancel("the server is shutting down")

    def _on_thread(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the engine's thread between iterations (here if it is not running); its result."""
        if self._thread is None or threading.current_thread() is self._thread:
            return work()
        future: Future = Future()
        with self._lock:
            self._jobs.append((work, future))
            self._lock.notify()
        return future.result()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._jobs or self._incoming or self.scheduler.busy() or self._stopping):
                    self._lock.wait(IDLE_WAIT_S)
                jobs, self._jobs = self._jobs, []
                self.scheduler.waiting.extend(self._incoming)
                self._incoming.clear()
                if self._stopping and not jobs and not self.scheduler.busy():
                    return
            for work, future in jobs:
                try:
                    future.set_result(work())
                except BaseException as error:  # noqa: BLE001 - the caller receives it
                    future.set_exception(error)
            try:
                self.scheduler.step()
            except Exception as error:  # noqa: BLE001 - end what ran and go on serving
                LOG.exception("an engine iteration failed")
                self.scheduler.fail_all(f"the engine failed: {type(error).__name__}: {error}")
