"""What the server serves, as ``/v1/models`` lists it, and the errors of registering and unloading."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.errors import LorakitError
from lorakit.serve.requests import RequestError

BASE_KIND = "base"


@dataclass(frozen=True)
class ModelCard:
    """One servable name: the base, an adapter (``parent`` = the base) or a mixture."""

    id: str
    kind: str
    """``"base"``, or the directory kind (``"adapter"``, ``"xlora"``, ``"mixlora"``, ``"meteora"``)."""
    parent: str | None
    path: str | None
    created: int
    """Unix time of registration (a reload under the same name gives a new card)."""


class RegistrationError(LorakitError, ValueError):
    """A directory cannot be served under a name (HTTP 400): missing, invalid, outside the adapter root,
    of a kind the engine cannot serve, or the name is taken by the base."""


class UnknownModel(RequestError):
    """A request or an unload names a model the server does not serve (HTTP 404)."""

    def __init__(self, name: str, served: list[str], field: str = "model") -> None:
        shown = ", ".join(served[:20]) + (", ..." if len(served) > 20 else "")
        super().__init__(field, f"no model named {name!r} is served; served: {shown}", status=404)
        self.name = name


class AdapterBusy(LorakitError, RuntimeError):
    """An unload waited for the requests using an adapter and they did not finish (HTTP 409)."""
