"""What to score: a folder walked recursively (files chosen by content), or a manifest with a ``path`` column.

A file is an input when its first bytes say DICOM / PNG / JPEG / TIFF, or when its extension claims one of those
(so a corrupt ``x.dcm`` becomes a ``failed`` row rather than vanishing). Anything else (a ``labels.csv`` beside
the images, notes, archives) is skipped and counted. Hidden files and folders are skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loupe.core.errors import ConfigError

log = logging.getLogger(__name__)

#: Extensions that claim an image or DICOM; a file with one of these is scored even if its content is broken.
IMAGE_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ".png", ".jpg", ".jpeg", ".tif", ".tiff"})
MANIFEST_SUFFIXES = frozenset({".csv", ".parquet", ".pq"})


@dataclass(frozen=True)
class InputList:
    """Absolute input paths in a stable order, plus how many files were looked at and left out."""

    paths: list[str]
    skipped: int
    source: str


def collect_inputs(input_path: str | Path, exclude: Sequence[Path] = ()) -> InputList:
    """Resolve ``--input`` (folder or manifest) to the files to score."""
    p = Path(input_path).expanduser()
    if not p.exists():
        raise ConfigError(f"--input {str(p)!r} does not exist; pass a folder of images/DICOM or a manifest CSV/Parquet")
    if p.is_dir():
        return walk_folder(p.resolve(), exclude=exclude)
    if p.suffix.lower() in MANIFEST_SUFFIXES:
        return read_manifest_paths(p.resolve())
    raise ConfigError(
        f"--input {str(p)!r} is a single file; pass the folder that holds it, or a manifest (.csv/.parquet) with a "
        f"'path' column"
    )


def is_scorable(path: Path) -> bool:
    """True when the content looks like DICOM/PNG/JPEG/TIFF, or the extension claims one of them."""
    from loupe.core.io import sniff_bytes

    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return bool(head) and sniff_bytes(head) != "unknown"


def walk_folder(root: Path, exclude: Sequence[Path] = ()) -> InputList:
    """Every scorable, non-hidden file under ``root`` (recursively, symlinked files followed), sorted by path."""
    excluded = {e.resolve() for e in exclude}
    paths: list[str] = []
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded)
        for name in sorted(filenames):
            f = here / name
            if name.startswith(".") or not f.is_file():
                continue
            if is_scorable(f):
                paths.append(str(f))
            else:
                skipped += 1
    if skipped:
        log.info("%s: %d files are not images or DICOM and were skipped", root, skipped)
    return InputList(sorted(paths), skipped, str(root))


def read_manifest_paths(manifest: Path) -> InputList:
    """The ``path`` column of a CSV/Parquet manifest (read by `loupe.core.data.read_manifest`); relative paths are
    taken from the manifest's folder."""
    from loupe.core.data.manifest import read_manifest

    df = read_manifest(manifest)
    if "path" not in df.columns:
        raise ConfigError(
            f"manifest {manifest} has no 'path' column (it has {list(df.columns)[:10]}); add one with each file's path"
        )
    missing = df["path"].isna()
    if missing.any():
        rows = [int(i) + 2 for i in df.index[missing][:5]]
        raise ConfigError(f"manifest {manifest}: empty 'path' on line(s) {rows}; every row needs a file path")
    base = manifest.parent
    paths = [str(p if (p := Path(s).expanduser()).is_absolute() else (base / p)) for s in df["path"]]
    dupes = len(paths) - len(set(paths))
    if dupes:
        log.warning("manifest %s lists %d paths more than once; each is scored once", manifest, dupes)
        paths = list(dict.fromkeys(paths))
    return InputList(paths, 0, str(manifest))
