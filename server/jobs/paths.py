"""Where the worker may read local files from, and where it caches things (``Settings.data_roots``
and ``Settings.cache_dir``, read from the environment at each call so a spec validates against the
deployment it is submitted to).

Job specs arrive from users (YAML on the command line, JSON over the REST API), so a path inside a
spec must never reach files the operator did not offer: every local path is resolved (symlinks and
``..`` included) and must land inside one of the configured data roots.
"""

from __future__ import annotations

import os
from pathlib import Path

from server.core.config import Settings

DATA_ROOTS_ENV = Settings.env_names()["data_roots"]


def cache_root() -> Path:
    """The writable cache directory (BPE tokenizers, HF dataset caches): ``Settings.cache_root``."""
    return Settings.from_env().cache_root


def data_roots() -> list[Path]:
    """Directories local spec paths may point into.

    ``Settings.data_roots`` when set, otherwise the current working directory and the cache root.
    Resolved so that comparisons below are between real locations.
    """
    settings = Settings.from_env()
    roots = list(settings.data_roots) or [Path.cwd(), settings.cache_root]
    return [root.resolve() for root in roots]


def confine_path(path: str | os.PathLike[str]) -> Path:
    """Resolve ``path`` (relative to the working directory) and check it lies inside a data root.

    Raises ``ValueError`` with the offending path and the allowed roots, so that a spec validator can
    hand the message to the user unchanged.
    """
    raw = os.fspath(path)
    if not raw.strip():
        raise ValueError("path is empty")
    if "\x00" in raw:
        raise ValueError("path contains a NUL byte")
    resolved = Path(raw).expanduser()
    if not resolved.is_absolute():
        resolved = Path.cwd() / resolved
    resolved = resolved.resolve()
    roots = data_roots()
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise ValueError(
            f"path {raw!r} resolves to {str(resolved)!r}, outside the allowed data roots ({allowed}); "
            f"move the file under one of them or set {DATA_ROOTS_ENV}"
        )
    return resolved
