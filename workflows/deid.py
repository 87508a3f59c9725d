"""De-identification before anything else sees a file: ``deidentify(IN, OUT, key)`` behind ``loupe deid IN OUT``.

DICOM goes through the PS3.15 Annex E basic profile with keyed, per-patient pseudonyms (`loupe.workflows.deid_dicom`);
PNG, JPEG and TIFF keep their pixels bit for bit and lose all metadata (`loupe.workflows.deid_images`); anything
else is listed as skipped and never copied.

Output files are named by an HMAC of their path relative to IN (so a patient's name in a file or folder name never
reaches OUT) and laid flat in OUT. Beside them: ``deid_report.csv`` (one row per input: what was done, counts,
never an original value), ``quarantine.csv`` (files that may show identity in their pixels: listed, not written)
and ``deid_run.json`` (profile, library versions, a fingerprint of the key, never the key). The mapping from input
paths to output names is written only where the user asks (``map_path``, outside IN and OUT). Every file is
written atomically; OUT must be new or empty unless resuming; one bad file is a ``failed`` row.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loupe.core.errors import ConfigError, UnsupportedInputError
from loupe.core.io.sniff import sniff_bytes
from loupe.workflows.deid_dicom import AnonymizerCache, Quarantined, Skipped, Unverified, deidentify_dicom
from loupe.workflows.deid_images import IMAGE_SUFFIX, strip_image

log = logging.getLogger(__name__)

KEY_ENV = "LOUPE_DEID_KEY"
MIN_KEY_CHARS = 32
MAKE_KEY = (
    'make one with `python -c "import secrets; print(secrets.token_hex(32))" > deid.key && chmod 600 deid.key`, '
    "keep it outside IN and OUT and back it up like the data: the same key gives the same pseudonyms in later runs"
)
REPORT_NAME, QUARANTINE_NAME, RUN_NAME = "deid_report.csv", "quarantine.csv", "deid_run.json"
PROFILE = "PS3.15 Annex E basic profile + retain longitudinal temporal information with modified dates"
MAX_FILE_BYTES = 2**31
REPORT_FIELDS = ("file_id", "output", "kind", "status", "reason", "patient", "patient_basis", "tags_replaced",
                 "tags_removed", "tags_emptied", "tags_dummy", "private_removed", "date_shift_applied",
                 "metadata_removed", "pixels_verified")  # fmt: skip
MAP_FIELDS = ("input", "file_id", "output", "status", "detail")
_DONE = ("ok", "quarantined", "skipped")


# ---------------------------------------------------------------- keys


def load_key(key_file: str | Path | None = None, env: Mapping[str, str] = os.environ) -> bytes:
    """The user's secret from ``key_file`` or ``$LOUPE_DEID_KEY``; refused when absent or shorter than 32 chars.

    The key is never written anywhere, never logged and never part of an error message.
    """
    if key_file is not None:
        source = f"--key-file {key_file}"
        try:
            raw = Path(key_file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{source} cannot be read ({exc.strerror or exc}); {MAKE_KEY}") from None
    elif env.get(KEY_ENV):
        source, raw = f"${KEY_ENV}", env[KEY_ENV].encode("utf-8", "surrogateescape")
    else:
        raise ConfigError(f"loupe deid needs a secret key: pass --key-file PATH or set {KEY_ENV}; {MAKE_KEY}")
    key = raw.strip()
    if len(key) < MIN_KEY_CHARS:
        raise ConfigError(f"{source} holds {len(key)} characters, a key needs at least {MIN_KEY_CHARS}; {MAKE_KEY}")
    return key


class _Keys:
    """Purpose-bound keys derived from the user's secret (which is not kept)."""

    def __init__(self, key: bytes | str):
        secret = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else bytes(key)
        if len(secret.strip()) < MIN_KEY_CHARS:
            raise ConfigError(f"the de-identification key has fewer than {MIN_KEY_CHARS} characters; {MAKE_KEY}")
        self._seed = _hmac(secret, b"loupe-deid/v1/dicom-seed")
        self._name = _hmac(secret, b"loupe-deid/v1/file-name")
        self.fingerprint = _hmac(secret, b"loupe-deid/v1/fingerprint").hex()[:16]

    def file_id(self, rel: str) -> str:
        """32 hex characters naming the input at ``rel`` (its path under IN, raw bytes of non-UTF-8 names)."""
        return _hmac(self._name, os.fsencode(rel)).hex()[:32]

    def patient_seed(self, basis: bytes) -> str:
        return _hmac(self._seed, basis).hex()


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


# ---------------------------------------------------------------- the batch


@dataclass
class _Row:
    file_id: str
    rel: str
    kind: str = ""
    status: str = "ok"
    reason: str = ""
    detail: str = ""  # the full message: only in the user's map file, never in OUT
    output: str = ""
    counts: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        base = {"file_id": self.file_id, "output": self.output, "kind": self.kind, "status": self.status,
                "reason": self.reason}  # fmt: skip
        return {k: base.get(k, self.counts.get(k, "")) for k in REPORT_FIELDS}


def deidentify(
    in_dir: str | Path,
    out_dir: str | Path,
    key: bytes | str,
    *,
    map_path: str | Path | None = None,
    resume: bool = False,
    retain_patient_characteristics: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_file: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """De-identify every file under ``in_dir`` into ``out_dir`` (see the module doc); returns a summary dict.

    ``out_dir`` must be new or empty unless ``resume`` (then files done by the earlier run with the same key are
    skipped). One bad file is a ``failed`` row and the batch goes on. ``on_start(total)`` and ``on_file(status)``
    drive a progress bar. Summary keys: ``files``, ``ok``, ``quarantined``, ``skipped``, ``failed``, ``resumed``,
    ``out``, ``report``, ``quarantine``, ``map`` and ``failed_ids`` / ``quarantined_ids`` (output names, no paths).
    """
    keys = _Keys(key)
    root, out, mapped = _check_paths(in_dir, out_dir, map_path, resume)
    prior = _prepare_out(out, keys, resume)
    old_map = _read_csv(mapped) if mapped is not None and resume and mapped.exists() else []
    entries = list(_walk(root))
    if not entries:
        raise ConfigError(
            f"IN {str(root)!r} holds no files (hidden files are skipped); point IN at the folder of images"
        )
    if on_start:
        on_start(len(entries))
    rows: list[_Row] = []
    anonymizers = AnonymizerCache(keys.patient_seed)
    last_save, counts = time.monotonic(), Counter()
    for rel, path, problem in entries:
        fid = keys.file_id(rel)
        old = prior.get(fid)
        done = old is not None and old["status"] in _DONE and (old["status"] != "ok" or (out / old["output"]).is_file())
        if done:
            rows.append(_Row(fid, rel, old["kind"], old["status"], old["reason"], output=old["output"],
                             counts={k: old.get(k, "") for k in REPORT_FIELDS}))  # fmt: skip
            counts["resumed"] += 1
        else:
            rows.append(_one(path, rel, fid, problem, out, anonymizers, retain_patient_characteristics))
        counts[rows[-1].status] += 1
        if on_file:
            on_file("resumed" if done else rows[-1].status)
        if time.monotonic() - last_save > 5:
            _save(out, mapped, rows, old_map)
            last_save = time.monotonic()
    _save(out, mapped, rows, old_map)
    return {
        "files": len(rows), **{s: counts[s] for s in ("ok", "quarantined", "skipped", "failed", "resumed")},
        "out": str(out), "report": str(out / REPORT_NAME), "quarantine": str(out / QUARANTINE_NAME),
        "map": str(mapped) if mapped else None,
        "failed_ids": [r.file_id for r in rows if r.status == "failed"],
        "quarantined_ids": [r.file_id for r in rows if r.status == "quarantined"],
    }  # fmt: skip


def _one(path: Path, rel: str, fid: str, problem: str, out: Path, anonymizers: AnonymizerCache, retain: bool) -> _Row:
    row = _Row(fid, rel)
    if problem:
        row.status, row.reason = ("skipped" if problem.startswith("symlinked folder") else "failed"), problem
        return row
    try:
        data = _read_bounded(path)
        fmt = sniff_bytes(data[:132])
        row.kind = "dicom" if fmt.startswith("dicom") else fmt
        if fmt == "unknown":
            raise Skipped("not DICOM, PNG, JPEG or TIFF content; not copied (it may hold identifying text)")
        if row.kind == "dicom":
            payload, row.counts, suffix = *deidentify_dicom(data, fmt, anonymizers, retain), ".dcm"
        else:
            payload, removed = strip_image(data, fmt)
            row.counts = {"metadata_removed": _fmt_counter(removed), "pixels_verified": "yes"}
            suffix = IMAGE_SUFFIX[fmt]
        row.output = fid + suffix
        _write_atomic(out / row.output, payload)
    except Quarantined as exc:
        row.status, row.reason = "quarantined", str(exc)
    except Skipped as exc:
        row.status, row.reason = "skipped", str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file is a failed row; the batch goes on
        row.status, row.detail = "failed", f"{type(exc).__name__}: {exc}"
        row.reason = _failure_reason(exc, row.kind, path)
        log.info("deid: %s failed (%s)", fid, type(exc).__name__)
    return row


def _failure_reason(exc: Exception, kind: str, path: Path) -> str:
    """A reason for OUT that names no path and no header value (the full message goes to the map file only)."""
    if isinstance(exc, UnsupportedInputError | Unverified):
        return str(exc).replace(str(path), "the file")
    what = kind or "input"
    return (f"could not be de-identified as {what} ({type(exc).__name__}); the full message is in the --map file; "
            f"fix or re-export the file and run again with --resume")  # fmt: skip


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_FILE_BYTES:
            raise UnsupportedInputError(f"{path}: is {size:,} bytes, over the {MAX_FILE_BYTES:,} limit; split it")
        data = fh.read(MAX_FILE_BYTES + 1)
    if not data:
        raise UnsupportedInputError(f"{path}: the file is empty (0 bytes); re-export it")
    return data


# ---------------------------------------------------------------- folders, OUT, resume


def _check_paths(in_dir: str | Path, out_dir: str | Path, map_path: str | Path | None, resume: bool):
    root = Path(in_dir).expanduser()
    if not root.is_dir():
        raise ConfigError(f"IN {str(root)!r} is not a folder; pass the folder that holds the files to de-identify")
    root = root.resolve()
    out = Path(out_dir).expanduser().absolute()
    real_out = out.resolve()
    if real_out == root or real_out.is_relative_to(root) or root.is_relative_to(real_out):
        raise ConfigError(f"OUT {str(out)!r} and IN {str(root)!r} overlap; name an OUT folder outside IN")
    mapped = None
    if map_path is not None:
        mapped = Path(map_path).expanduser().absolute()
        real = mapped.resolve()
        if real.is_relative_to(real_out) or real.is_relative_to(root):
            raise ConfigError(f"--map {str(mapped)!r} is inside IN or OUT; the map links pseudonyms to the original "
                              f"paths, keep it outside both (and as private as the key)")  # fmt: skip
        if mapped.exists() and not resume:
            raise ConfigError(f"--map {str(mapped)!r} already exists; nothing is overwritten: name a new file, or "
                              f"pass --resume to continue the run that wrote it")  # fmt: skip
    return root, out, mapped


def _prepare_out(out: Path, keys: _Keys, resume: bool) -> dict[str, dict[str, str]]:
    """Create OUT (or check it on --resume) and return the earlier report's rows by file id."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT {str(out)!r} is a file; name a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    run = {"profile": PROFILE, "key_fingerprint": keys.fingerprint, "libraries": _versions()}
    if held and not resume:
        raise ConfigError(f"OUT {str(out)!r} already holds {len(held)} files (e.g. {held[0]!r}); nothing is "
                          f"overwritten: name a new or empty folder, or pass --resume to continue an earlier "
                          f"`loupe deid` run on it")  # fmt: skip
    if held:
        try:
            earlier = json.loads((out / RUN_NAME).read_text())
        except (OSError, ValueError):
            raise ConfigError(f"OUT {str(out)!r} holds files but no readable {RUN_NAME}: it is not the output of "
                              f"`loupe deid`; name a new or empty folder") from None  # fmt: skip
        if earlier.get("key_fingerprint") != keys.fingerprint:
            raise ConfigError(f"OUT {str(out)!r} was written with another key (the fingerprint in {RUN_NAME} "
                              f"differs); resume with the same key, or name a new folder")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / RUN_NAME, json.dumps(run, indent=1).encode())
    return {r["file_id"]: r for r in _read_csv(out / REPORT_NAME)} if held else {}


def _walk(root: Path) -> Iterator[tuple[str, Path, str]]:
    """``(path relative to root, path, problem)`` for every non-hidden entry, sorted; ``problem`` is set for what is
    refused without being opened: symlinks out of IN, FIFOs / devices / sockets, dangling links, linked folders."""
    found: list[tuple[str, Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            if (here / d).is_symlink():
                dirnames.remove(d)
                if not d.startswith("."):
                    found.append((_rel(here / d, root), here / d, "symlinked folder not followed"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith("."):
                p = here / name
                found.append((_rel(p, root), p, _refusal(p, root)))
    yield from sorted(found, key=lambda t: os.fsencode(t[0]))


def _refusal(p: Path, root: Path) -> str:
    try:
        if p.is_symlink() and not p.resolve().is_relative_to(root):
            return "symlink pointing outside IN; refused (copy the file into IN if it belongs to the batch)"
        mode = p.stat().st_mode
    except OSError:
        return "dangling symlink or unreadable entry"
    return "" if stat.S_ISREG(mode) else "not a regular file (FIFO, device or socket); never opened"


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


def _save(out: Path, mapped: Path | None, rows: list[_Row], old_map: list[dict[str, str]]) -> None:
    _write_atomic(out / REPORT_NAME, _csv(REPORT_FIELDS, [r.report() for r in rows]))
    quarantined = [
        {"file_id": r.file_id, "kind": r.kind, "reason": r.reason} for r in rows if r.status == "quarantined"
    ]
    _write_atomic(out / QUARANTINE_NAME, _csv(("file_id", "kind", "reason"), quarantined))
    if mapped is not None:
        from loupe.workflows.scoring.inputs import utf8_text

        new = {r.file_id: {"input": utf8_text(r.rel), "file_id": r.file_id, "output": r.output, "status": r.status,
                           "detail": r.detail or r.reason} for r in rows}  # fmt: skip
        kept = [m for m in old_map if m.get("file_id") not in new]
        mapped.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(mapped, _csv(MAP_FIELDS, [*kept, *new.values()]))


def _csv(fields: tuple[str, ...], rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, csv.Error) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}); remove it and run without --resume") from None


def _write_atomic(dst: Path, payload: bytes) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _fmt_counter(c: Counter) -> str:
    return ";".join(f"{k}:{v}" for k, v in sorted(c.items()))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("dicognito", "dicom-anonymizer", "pydicom", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out
