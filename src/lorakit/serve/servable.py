"""Which directories a server may load: existing ones, and with an adapter root only those inside it.

Runtime loading takes paths from HTTP clients, so with ``root`` a path is refused if it names a
parent (``..``) anywhere, or if it resolves (symbolic links followed) to a place outside ``root``.
A missing path, or one that is not a directory, is an error: never a registration that "succeeded".
"""

from __future__ import annotations

from pathlib import Path

from lorakit.serve.cards import RegistrationError


def servable_directory(path: str | Path, root: Path | None) -> Path:
    """``path`` resolved (relative paths are relative to ``root`` when given), checked as described above."""
    if not isinstance(path, (str, Path)) or not str(path).strip():
        raise RegistrationError(f"an adapter path must be a non-empty string; got {path!r}")
    given = Path(path).expanduser()
    if root is not None:
        if ".." in given.parts:
            raise RegistrationError(f"{path}: a path through '..' is refused; give a path inside {root}")
        root = root.resolve()
        resolved = (given if given.is_absolute() else root / given).resolve()
        if resolved != root and root not in resolved.parents:
            raise RegistrationError(f"{path} resolves to {resolved}, outside the adapter root {root}")
    else:
        resolved = given.resolve()
    if not resolved.exists():
        raise RegistrationError(f"{path}: no such directory")
    if not resolved.is_dir():
        raise RegistrationError(f"{path} is not a directory")
    return resolved
