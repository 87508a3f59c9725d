"""Ad-hoc scoring of a file a reviewer drops on the dashboard: checked, stored inside the app's data folder under
a name made from its content (never the uploaded name, which could point anywhere or name a patient), scored with
the domain's champion model, and returned as a review case."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from loupe.core.errors import ConfigError, LoupeError
from loupe.core.io.sniff import IMAGE_SUFFIXES, sniff_bytes
from loupe.core.review import ReviewCase

#: Largest upload accepted (bytes); the Streamlit server is started with the same limit.
MAX_UPLOAD_BYTES = 200 * 2**20
UPLOADS = "uploads"


class UploadError(LoupeError):
    """An uploaded file was refused (too large, not a supported type); the message says what to do."""


@dataclass(frozen=True)
class Upload:
    path: Path  # where it was stored, inside the data folder
    kind: str  # what its content is (dicom, png, jpeg, tiff)
    sha256: str


def store_upload(data_dir: str | Path, name: str, content: bytes, max_bytes: int = MAX_UPLOAD_BYTES,
                 suffixes: Collection[str] = ()) -> Upload:  # fmt: skip
    """Check an upload and write it to ``<data_dir>/uploads/<sha256>/input<suffix>``; refuses with `UploadError`.
    ``suffixes``: the domain's own input formats (slides, clips) accepted by name besides DICOM / PNG / JPEG / TIFF,
    which are recognised by content."""
    accepted = IMAGE_SUFFIXES | {s.lower() for s in suffixes}
    if not content:
        raise UploadError(f"{name!r} is empty (0 bytes); upload the file itself")
    if len(content) > max_bytes:
        raise UploadError(
            f"{name!r} is {len(content) / 2**20:.1f} MiB, more than the {max_bytes / 2**20:.0f} MiB an upload may "
            f"be; score large files with `loupe score` instead"
        )
    kind = sniff_bytes(content[:132])
    suffix = Path(name).suffix.lower()
    if kind == "unknown" and suffix not in accepted:
        extra = sorted(set(accepted) - set(IMAGE_SUFFIXES))
        raise UploadError(
            f"{name!r} is not a DICOM, PNG, JPEG or TIFF file (by its content and its name)"
            + (f" nor one of this domain's formats ({', '.join(extra)})" if extra else "")
            + "; upload one of those"
        )
    digest = hashlib.sha256(content).hexdigest()
    folder = (Path(data_dir) / UPLOADS / digest).resolve()
    root = (Path(data_dir) / UPLOADS).resolve()
    if root not in folder.parents:  # cannot happen with a hex name; kept as the invariant it is
        raise UploadError("refusing to write outside the dashboard's data folder")
    folder.mkdir(parents=True, exist_ok=True)
    ext = {"dicom": ".dcm", "dicom-no-preamble": ".dcm", "png": ".png", "jpeg": ".jpg", "tiff": ".tif"}.get(kind)
    dst = folder / f"input{ext or (suffix if suffix in accepted else '.bin')}"
    if not dst.exists():
        tmp = dst.with_name(dst.name + ".tmp")
        tmp.write_bytes(content)
        tmp.replace(dst)
    return Upload(dst, kind if kind != "unknown" else f"claimed by its name ({suffix})", digest)


def champion(domain: str, tracker, alias: str = "champion") -> str:
    """``models:/NAME@champion`` of the registered model whose champion belongs to ``domain`` (its run's ``domain``
    tag); a `ConfigError` naming what to register when there is none."""
    rows = [r for r in tracker.registered_models() if alias in r["aliases"]]
    for r in rows:
        if r.get("run_id") and tracker.run_tags(r["run_id"]).get("domain") == domain:
            return f"models:/{r['name']}@{alias}"
    raise ConfigError(
        f"no registered model of domain {domain!r} has the alias @{alias}; register one with "
        f"`loupe models register --run-id RUN --name NAME --alias {alias}` (`loupe demo` registers {domain}-demo)"
    )


def score_upload(upload: Upload, domain: str, model: str, tracking_uri: str | None, resolved=None) -> ReviewCase:
    """Score the stored upload with ``model`` (``resolved``: that model already loaded) into
    ``<its folder>/predictions.parquet`` (an MLflow run of the ``loupe-dashboard`` experiment) and return its review
    case (a failed case says why in its status)."""
    from loupe.workflows.review.cases import review_cases
    from loupe.workflows.scoring import ScoreOptions, score

    out = upload.path.parent / "predictions.parquet"
    opts = ScoreOptions(domain=domain, input=upload.path.parent, model=model, out=out, mode="overwrite",
                        explain=True, num_workers=0, tracking_uri=tracking_uri, experiment="loupe-dashboard",
                        tags={"source": "dashboard-upload"})  # fmt: skip
    score(opts, resolved=resolved)
    (case,) = list(review_cases(out))
    return case
