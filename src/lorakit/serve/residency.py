"""Which plain adapters the shared base holds: served versions, kept resident up to a limit, least recently
used first out, never while a sequence uses them.

Every registration (a reload under the same name too) is a new *version* with its own internal adapter
name, so a sequence that started with one version keeps it to its end while new requests get the new
one: a reload never serves a request with another adapter than the one it started with. A version is
loaded into the base when a request needs it and, beyond ``max_resident``, the least recently used
version that no sequence holds is deleted from the base (its files stay registered, to be loaded again
on demand). Only the engine's thread calls these methods: they change the model.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lorakit.core.lifecycle import delete_adapter
from lorakit.errors import LorakitError
from lorakit.io.adapters import load_adapter
from lorakit.io.metadata import read_metadata
from lorakit.serve.cards import ModelCard, RegistrationError


@dataclass(frozen=True)
class AdapterVersion:
    """One registration of a plain adapter directory under a served name."""

    name: str
    path: Path
    internal: str
    """The adapter's name inside the base model (unique per version)."""
    card: ModelCard


def recorded_quantization(path: Path) -> str | None:
    """The ``base_quantization`` the directory at ``path`` records (None: none, or no ``lorakit.json``)."""
    try:
        metadata = read_metadata(Path(path))
    except LorakitError as error:
        raise RegistrationError(f"{path} cannot be served: {error}") from None
    return metadata.base_quantization if metadata else None


def check_served_quantization(path: Path, base_quantization: str | None) -> None:
    """Refuse an adapter recording another base quantization than the served base's, naming both."""
    recorded = recorded_quantization(path)
    if recorded != base_quantization:
        raise RegistrationError(
            f"{path} was trained on a {recorded or 'full-precision'} base, but this server's base is "
            f"{base_quantization or 'full precision'}; serve it from a server started with it among --adapter "
            f"(the base is then loaded as the adapters record), or with adapters trained on the same base")


class Residency:
    """The served plain adapters of the shared base; see the module docstring."""

    def __init__(self, model: nn.Module, base_name: str, max_resident: int,
                 base_quantization: str | None = None) -> None:
        if max_resident < 1:
            raise RegistrationError(f"max_resident_adapters={max_resident} must be at least 1")
        self.model = model
        self.base_quantization = base_quantization
        """The scheme the base was quantized with as it loaded (None: full precision)."""
        self.base_name = base_name
        self.max_resident = max_resident
        self.current: dict[str, AdapterVersion] = {}
        """Served name -> the version new requests get."""
        self.resident: OrderedDict[str, AdapterVersion] = OrderedDict()
        """Versions loaded into the base, least recently used first."""
        self.in_use: Counter[str] = Counter()
        self._serial = itertools.count()

    def register(self, name: str, path: Path) -> AdapterVersion:
        """Serve the adapter at ``path`` as ``name`` (a new version if ``name`` is served): loaded once now, so a
        directory that does not fit the base is refused here with the reason, as is one trained on a base quantized
        otherwise than this one (its answers would not be the ones it was trained and evaluated with)."""
        check_served_quantization(path, self.base_quantization)
        version = AdapterVersion(name, path, f"served{next(self._serial)}",
                                 ModelCard(name, "adapter", self.base_name, str(path), int(time.time())))
        self._evict_down_to(self.max_resident - 1)
        try:
            load_adapter(self.model, path, version.internal, activate=False)
        except LorakitError as error:
            raise RegistrationError(f"{path} cannot be served as {name!r}: {error}") from None
        self.resident[version.internal] = version
        previous = self.current.get(name)
        self.current[name] = version
        if previous is not None:
            self._retire(previous)
        self._evict_down_to(self.max_resident)
        return version

    def unregister(self, name: str) -> None:
        """Stop serving ``name`` to new requests; its version leaves the base once no sequence holds it."""
        version = self.current.pop(name)
        self._retire(version)

    def users(self, name: str) -> int:
        """How many sequences hold the current version of ``name``."""
        return self.in_use[self.current[name].internal]

    def acquire(self, versions: list[AdapterVersion]) -> bool:
        """Hold ``versions`` for a sequence, loading those not resident; False (nothing held) when the base
        cannot hold them all without evicting versions in use."""
        missing = [v for v in versions if v.internal not in self.resident]
        evictable = [i for i in self.resident if self.in_use[i] == 0 and i not in {v.internal for v in versions}]
        if len(self.resident) + len(missing) - len(evictable) > max(self.max_resident, len(versions)):
            return False
        for version in missing:
            self._evict_down_to(self.max_resident - 1, keep={v.internal for v in versions})
            load_adapter(self.model, version.path, version.internal, activate=False)
            self.resident[version.internal] = version
        for version in versions:
            self.in_use[version.internal] += 1
            self.resident.move_to_end(version.internal)
        return True

    def release(self, versions: list[AdapterVersion]) -> None:
        """A sequence holding ``versions`` ended."""
        for version in versions:
            self.in_use[version.internal] -= 1
            if self.in_use[version.internal] <= 0:
                del self.in_use[version.internal]
                if self.current.get(version.name) is not version:  # retired while in use: now it goes
                    self._unload(version.internal)
        self._evict_down_to(self.max_resident)

    def _retire(self, version: AdapterVersion) -> None:
        if self.in_use[version.internal] == 0:
            self._unload(version.internal)

    def _evict_down_to(self, limit: int, keep: set[str] | frozenset[str] = frozenset()) -> None:
        """Evict least recently used idle versions (not in ``keep``) until at most ``limit`` are resident."""
        while len(self.resident) > limit:
            idle = next((i for i in self.resident if self.in_use[i] == 0 and i not in keep), None)
            if idle is None:
                return
            self._unload(idle)

    def _unload(self, internal: str) -> None:
        if self.resident.pop(internal, None) is not None:
            delete_adapter(self.model, internal)

