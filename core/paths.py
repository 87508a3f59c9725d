"""Where Loupe keeps its own files: the MLflow store, the weight cache, demo outputs.

``LOUPE_HOME`` overrides the per-user default (``$XDG_DATA_HOME/loupe`` or ``~/.local/share/loupe``).
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """The per-user data folder (created on first use)."""
    env = os.environ.get("LOUPE_HOME")
    if env:
        root = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        root = Path(base) / "loupe"
    root.mkdir(parents=True, exist_ok=True)
    return root


def weights_cache_dir() -> Path:
    """Where fetched or imported weights live: ``<data_dir>/weights/<source-specific path>``."""
    env = os.environ.get("LOUPE_WEIGHTS_DIR")
    root = Path(env).expanduser() if env else data_dir() / "weights"
    root.mkdir(parents=True, exist_ok=True)
    return root


def shared_data_dir() -> Path | None:
    """``LOUPE_SHARED_DATA`` or the ``shared/data`` folder beside the repository checkout, when present: real data
    the demos may train on (never required)."""
    env = os.environ.get("LOUPE_SHARED_DATA")
    p = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return p if p.is_dir() else None
