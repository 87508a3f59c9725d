"""What to score: a folder walked recursively (files chosen by content), or a manifest with a ``path`` column.

A file is an input when its first bytes say DICOM / PNG / JPEG / TIFF, or when its extension claims one of those
or one of the domain's own formats (so a corrupt ``x.dcm`` becomes a ``failed`` row rather than vanishing).
Anything else (a ``labels.csv`` beside the images, notes, archives) is skipped and counted. Hidden files and
folders are skipped. The input *root* is the folder (or the manifest's folder): tables record paths relative
to it, so a table names no folder above what the user passed.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loupe.core.errors import ConfigError
from loupe.core.io.sniff import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = frozenset({".csv", ".parquet", ".pq"})


@dataclass(frozen=True)
class InputList:
    """Absolute input paths in a stable order, the root they are recorded relative to, and what was left out."""

    paths: list[str]
    root: Path
    skipped: int
    source: str
    kind: str = "folder"  # folder | manifest
    skipped_examples: list[str] = field(default_factory=list)
    path_key: bytes | None = None  # set: paths are recorded as keyed pseudonyms (`--pseudonymise-paths`)

    def relative(self, path: str) -> str:
        """``path`` as recorded in tables (see `recorded_path`)."""
        return recorded_path(path, self.root, self.path_key)


def utf8_text(s: str) -> str:
    """``s`` as valid UTF-8 text: bytes of a file name that are not UTF-8 (which Python keeps as surrogate escapes,
    and Parquet, JSON and MLflow refuse) written as ``\\xNN``."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def recorded_path(path: str | Path, root: str | Path, key: bytes | None = None) -> str:
    """A path as tables record it: relative to the input root, POSIX separators, valid UTF-8 (`utf8_text`); with a
    ``key``, a pseudonym instead (`pseudonym`)."""
    rel = Path(os.path.relpath(path, root)).as_posix()
    return pseudonym(rel, key) if key is not None else utf8_text(rel)


def pseudonym(rel: str, key: bytes) -> str:
    """``rel`` (a path relative to the input root) as ``p-<HMAC-SHA256 under key, 24 hex>`` + its suffix: the same
    file always gets the same name under the same key (resume, joins), and a name cannot be guessed back without the
    key (a plain hash of "Doe^John/chest.dcm" could be)."""
    import hashlib
    import hmac

    digest = hmac.new(key, b"loupe-score/v1/path\0" + os.fsencode(rel), hashlib.sha256).hexdigest()[:24]
    suffix = Path(rel).suffix.lower()
    return f"p-{digest}{suffix if suffix.isascii() and len(suffix) <= 8 else ''}"


def collect_inputs(
    input_path: str | Path, exclude: Sequence[Path] = (), suffixes: Collection[str] = IMAGE_SUFFIXES
) -> InputList:
    """Resolve ``--input`` (folder or manifest) to the files to score; no inputs at all is a usage error."""
    p = Path(input_path).expanduser()
    if not p.exists():
        raise ConfigError(f"--input {str(p)!r} does not exist; pass a folder of images/DICOM or a manifest CSV/Parquet")
    if p.is_dir():
        found = walk_folder(p.resolve(), exclude=exclude, suffixes=suffixes)
    elif p.suffix.lower() in MANIFEST_SUFFIXES:
        found = read_manifest_paths(p.resolve())
    else:
        raise ConfigError(
            f"--input {str(p)!r} is a single file; pass the folder that holds it, or a manifest (.csv/.parquet) with "
            f"a 'path' column"
        )
    if not found.paths:
        raise ConfigError(_nothing_found(found, suffixes))
    return found


def _nothing_found(found: InputList, suffixes: Collection[str]) -> str:
    if found.kind == "manifest":
        return f"--input {found.source}: the manifest has no rows; add one row per file to score"
    what = (
        "it is empty"
        if not found.skipped
        else (f"it holds {found.skipped} other files (e.g. {', '.join(found.skipped_examples)}), none of them an image")
    )
    return (
        f"--input {found.source} holds no images or DICOM to score: {what}. Inputs are found by content "
        f"(DICOM/PNG/JPEG/TIFF) or by extension ({', '.join(sorted(suffixes))}); point --input at the folder that "
        f"holds them, or pass a manifest with a 'path' column"
    )


def is_scorable(path: Path, suffixes: Collection[str] = IMAGE_SUFFIXES) -> bool:
    """True when the content looks like DICOM/PNG/JPEG/TIFF, or the extension claims an input format."""
    from loupe.core.io.sniff import sniff_bytes

    if path.suffix.lower() in suffixes:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return bool(head) and sniff_bytes(head) != "unknown"


def walk_folder(root: Path, exclude: Sequence[Path] = (), suffixes: Collection[str] = IMAGE_SUFFIXES) -> InputList:
    """Every scorable, non-hidden file under ``root`` (recursively, symlinked files followed), sorted by path. FIFOs,
    devices, sockets and dangling links are listed too, without being opened, so each becomes a ``failed`` row
    (`loupe.core.io.content_identity` refuses them) instead of vanishing or hanging a reader."""
    excluded = {e.resolve() for e in exclude}
    paths: list[str] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in excluded)
        for name in sorted(filenames):
            f = here / name
            if name.startswith("."):
                continue
            try:
                mode = f.stat().st_mode  # follows links
            except OSError:  # a dangling link: a row that says the file does not exist
                paths.append(str(f))
                continue
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):  # a FIFO, device or socket: never opened (it may block forever), a row
                paths.append(str(f))
                continue
            if is_scorable(f, suffixes):
                paths.append(str(f))
            else:
                skipped.append(name)
    if skipped:
        log.info("%s: %d files are not inputs and were skipped", root, len(skipped))
    return InputList(sorted(paths), root, len(skipped), str(root), "folder", skipped[:3])


def read_manifest_paths(manifest: Path) -> InputList:
    """The ``path`` column of a CSV/Parquet manifest (read by `loupe.core.data.read_manifest`); relative paths are
    taken from the manifest's folder, which is the root."""
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
    return InputList(paths, base, 0, str(manifest), "manifest")
