"""Where the worker may read local files from, and where it caches things (``Settings.data_roots``
and ``Settings.cache_dir``, read from the environment at each call so a spec validates against the
deployment it is submitted to).

Job specs arrive from users (YAML on the command line, JSON over the REST API), so a path inside a
spec must never reach files the operator did not offer: every local path is resolved (symlinks and
``..`` included) and must land inside one of the configured data roots (``DYKAF_DATA_ROOTS``,
``os.pathsep``-separated; default ``./data``, a folder meant for nothing but corpora and models).

Whatever the roots are — even ``/`` — the lab's own state is never readable as a corpus or a model:
the state directory (``DYKAF_DATA_DIR``, default ``./.lab``: database, API key, logs, checkpoints),
the SQLite files of ``DYKAF_DATABASE_URL`` / ``DYKAF_BROKER_URL`` and the cache directory. These are
read from the environment the way the settings read them, so the API process and the workers refuse
the same paths.

Refusals name only the path as the user wrote it: an API client learns neither the server's
absolute paths nor where a symlink points.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

from server.core.config import Settings

DATA_ROOTS_ENV = Settings.env_names()["data_roots"]
DEFAULT_DATA_ROOT = "data"  # relative to the working directory (the checkout for ./lab up)


def cache_root() -> Path:
    """The writable cache directory (BPE tokenizers, HF dataset caches): ``Settings.cache_root``."""
    return Settings.from_env().cache_root


def data_roots() -> list[Path]:
    """Directories local spec paths may point into: ``Settings.data_roots`` when set, otherwise
    ``./data``. Resolved so that comparisons below are between real locations."""
    roots = list(Settings.from_env().data_roots) or [Path.cwd() / DEFAULT_DATA_ROOT]
    return [root.resolve() for root in roots]


def _sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///rel.db`` / ``sqlite:////abs.db`` URL (also ``sqla+sqlite``);
    None for any other URL or an in-memory database."""
    scheme, _, rest = url.partition("://")
    if not scheme.endswith("sqlite") or not rest.startswith("/"):
        return None
    path = unquote(rest[1:].split("?", 1)[0])
    return Path(path) if path and path != ":memory:" else None


def state_paths() -> list[Path]:
    """What jobs may never read: the state directory, the SQLite database and broker files (with
    their ``-wal``/``-journal`` companions, checked by prefix) and the cache directory."""
    settings = Settings.from_env()
    state_dir = settings.data_dir.expanduser()
    paths = [state_dir if state_dir.is_absolute() else Path.cwd() / state_dir, settings.cache_root]
    for url in (settings.database_url, settings.broker_url):
        db = _sqlite_file(url)
        if db is not None:
            paths.append(db if db.is_absolute() else Path.cwd() / db)
    return [p.resolve() for p in paths]


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def _is_state(path: Path) -> bool:
    for state in state_paths():
        if _inside(path, state):
            return True
        # A database file's companions (lab.db-wal, lab.db-journal) live beside it.
        if path.parent == state.parent and path.name.startswith(state.name + "-") and state.suffix == ".db":
            return True
    return False


def confine_path(path: str | os.PathLike[str]) -> Path:
    """Resolve ``path`` (relative to the working directory) and check it lies inside a data root
    and outside the lab's state.

    Raises ``ValueError`` with a message that quotes only ``path`` as given (no resolved location,
    no root), so that a spec validator can hand it to an API client unchanged.
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
    if _is_state(resolved):
        raise ValueError(
            f"path {raw!r} is inside the lab state (database, keys, logs, checkpoints or caches), "
            "which jobs may not read"
        )
    if not any(_inside(resolved, root) for root in data_roots()):
        raise ValueError(
            f"path {raw!r} is outside the allowed data roots; put the file under a data root "
            f"({DATA_ROOTS_ENV}, by default ./{DEFAULT_DATA_ROOT} in the working directory of the server)"
        )
    return resolved
