"""One DICOM file through the PS3.15 Annex E Basic Application Level Confidentiality Profile (for `loupe deid`).

The profile is applied with the *Retain Longitudinal Temporal Information with Modified Dates* option, through
kept libraries rather than rules written here:

1. **dicognito** replaces every person name, patient / accession / study ID, address, institution and UID with a
   pseudonym and shifts every date (and the time beside it) back by 62-730 days. It is seeded per patient with an
   HMAC of the user's secret key and the patient's identity, so the same patient gets the same pseudonyms and the
   same date shift in every file, batch and run, two patients get different ones, and order within a patient is
   kept. Nobody without the key can recompute a pseudonym from a name.
2. ``Dataset.remove_private_tags`` (pydicom) removes every private element.
3. Every other element named in Table E.1-1 (the 2026c table as published in **dicom-anonymizer**'s database) gets
   its action: X removed, Z emptied (X/Z and X/Z/D too, which keeps type-2 elements present), D a dummy value.
   The patient's birth date and time are emptied, as the basic profile says (they are not longitudinal dates).
4. DeidentificationMethod (Code Sequence) records the profile and options; the file meta is rebuilt (only the SOP
   class / instance and transfer syntax survive) and the preamble zeroed.
5. A residual check: if an original name / ID / birth date / accession number / institution still appears as a
   word in any text element, the file is quarantined instead of written.

Pixels are never changed (checked on the bytes written). Files that may show identity in their pixels are
quarantined, not written: ``BurnedInAnnotation`` YES, ``RecognizableVisualFeatures`` YES, slide label images, and
images without a ``BurnedInAnnotation`` flag whose modality routinely burns in text (`BURNED_IN_MODALITIES`:
ultrasound, secondary / other captures, endoscopy, photographs, documents). The modality decides, not the SOP
class: many archives store converted chest films as Secondary Capture with modality CR.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

from loupe.core.errors import LoupeError, UnsupportedInputError

#: Modalities whose images routinely carry burned-in text: without a BurnedInAnnotation flag they are quarantined.
BURNED_IN_MODALITIES = frozenset({"US", "IVUS", "SC", "OT", "XC", "ES", "GM", "OP", "DOC"})
#: Annex E "Retain Patient Characteristics" subset kept by ``retain_patient_characteristics`` (age capped at 90 y).
PATIENT_CHARACTERISTICS = frozenset({"PatientSex", "PatientAge", "PatientSize", "PatientWeight"})
#: Original values that must not survive anywhere in the header (the residual check).
_IDENTIFYING = (
    *("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName", "InstitutionAddress"),
    *("OtherPatientIDs", "OtherPatientNames", "PatientAddress", "IssuerOfPatientID", "PatientTelephoneNumbers"),
    *("ReferringPhysicianName", "PatientMotherBirthName", "MedicalRecordLocator"),
)
_ID_LIKE = frozenset({"PatientID", "PatientBirthDate", "AccessionNumber", "OtherPatientIDs", "IssuerOfPatientID",
                      "MedicalRecordLocator", "PatientTelephoneNumbers"})  # fmt: skip
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DS", "IS", "LO", "LT", "PN", "SH", "ST", "UC", "UI", "UR", "UT"})
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
_BIRTH = (0x00100030, 0x00100032)  # PatientBirthDate, PatientBirthTime: Z in the basic profile, not shifted
_DICOMDIR_UID = "1.2.840.10008.1.3.10"


class Quarantined(LoupeError):
    """The file may show identity in its pixels (or kept an identifier); it is listed, not written."""


class Skipped(LoupeError):
    """The file is not something to de-identify (not an image, a DICOMDIR); it is listed, not copied."""


class Unverified(LoupeError):
    """The written file does not read back with the same pixels."""


class AnonymizerCache:
    """One dicognito `Anonymizer` per patient; ``seed_of(basis)`` turns a patient's identity into its seed (an HMAC
    under the user's key), so nothing here ever sees the key."""

    def __init__(self, seed_of: Callable[[bytes], str], size: int = 256):
        self._seed_of, self._size, self._cache = seed_of, size, {}

    def get(self, basis: bytes) -> Any:
        seed = self._seed_of(basis)
        if seed not in self._cache:
            from dicognito.anonymizer import Anonymizer

            if len(self._cache) >= self._size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[seed] = Anonymizer(seed=seed)
        return self._cache[seed]


def deidentify_dicom(data: bytes, fmt: str, anonymizers: AnonymizerCache, retain: bool) -> tuple[bytes, dict[str, Any]]:
    """``(de-identified file bytes, report counts)`` for the DICOM file content ``data`` (``fmt`` as sniffed);
    raises `Quarantined`, `Skipped` or `Unverified`, or the library's error for a file it cannot parse."""
    with _quiet_pydicom():
        return _deidentify(data, fmt, anonymizers, retain)


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns (and logs) about invalid values by quoting them, which would put header values (names, IDs)
    into the logs; those warnings are dropped for the duration of one file."""
    logger = logging.getLogger("pydicom")

    def drop(record: logging.LogRecord) -> bool:
        return False

    logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeFilter(drop)


def _deidentify(data: bytes, fmt: str, anonymizers: AnonymizerCache, retain: bool) -> tuple[bytes, dict[str, Any]]:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=fmt == "dicom-no-preamble")
    if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_UID:
        raise Skipped("a DICOMDIR (a media index naming the original files); not copied, rebuild one from OUT")
    reason = burned_in_reason(ds)
    if reason:
        raise Quarantined(reason)
    pixels_before = _pixel_digest(ds)
    needles = _needles(ds)
    basis_name, basis = _patient_basis(ds)
    before = _snapshot(ds)
    anonymizers.get(basis).anonymize(ds)
    after = _snapshot(ds)
    replaced = {k for k, v in after.items() if before.get(k, v) != v}
    counts = Counter(tags_replaced=len(replaced), tags_removed=sum(k not in after for k in before))
    counts["private_removed"] = _count_private(ds)
    ds.remove_private_tags()
    _apply_annex_e(ds, replaced, retain, counts)
    _record_method(ds, retain)
    _rebuild_file_meta(ds)
    leaked = _residual(ds, needles)
    if leaked:
        raise Quarantined(f"an original identifier ({leaked}) is still in a header element after de-identification")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    payload = buf.getvalue()
    if _pixel_digest(pydicom.dcmread(io.BytesIO(payload))) != pixels_before:
        raise Unverified("the pixel data read back differs from the input's; nothing was written")
    dated = any(_vr(k[-1]) in ("DA", "DT") for k in replaced if k[-1] not in _BIRTH)
    pid = ds.get("PatientID", "")
    return payload, {**counts, "patient": str(pid) if pid else "", "patient_basis": basis_name,
                     "date_shift_applied": "yes" if dated else "no", "pixels_verified": "yes"}  # fmt: skip


def burned_in_reason(ds: Any) -> str:
    """Why ``ds`` may show identity in its pixels (quarantine), or ``""``."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES: text in the pixels may identify the patient"
    if str(ds.get("RecognizableVisualFeatures", "") or "").strip().upper() == "YES":
        return "RecognizableVisualFeatures is YES: the image may show the patient's face or features"
    image_type = {str(v).upper() for v in (ds.get("ImageType") or [])} if "ImageType" in ds else set()
    if "LABEL" in image_type:
        return "a slide label image (ImageType LABEL): it carries the case's printed label"
    if flag != "NO" and modality in BURNED_IN_MODALITIES and _has_pixels(ds):
        return (f"BurnedInAnnotation is missing on modality {modality}, which routinely burns text into the pixels; "
                f"check the image and set BurnedInAnnotation NO at the source if it is clean")  # fmt: skip
    return ""


def _has_pixels(ds: Any) -> bool:
    return any(t in ds for t in _PIXEL_TAGS)


def _pixel_digest(ds: Any) -> str:
    h = hashlib.sha256()
    for t in _PIXEL_TAGS:
        if t in ds:
            h.update(t.to_bytes(4, "big") + bytes(ds[t].value or b""))
    return h.hexdigest()


def _patient_basis(ds: Any) -> tuple[str, bytes]:
    """What identifies the patient for seeding: (issuer +) Patient ID, else name + birth date, else the study."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return "PatientID", b"pid\0" + str(
            ds.get("IssuerOfPatientID", "") or ""
        ).strip().encode() + b"\0" + pid.encode()
    name = str(ds.get("PatientName", "") or "").strip()
    if name:
        return "PatientName+BirthDate", b"pn\0" + name.encode() + b"\0" + str(ds.get("PatientBirthDate", "")).encode()
    study = str(ds.get("StudyInstanceUID", "") or "").strip()
    if study:
        return "StudyInstanceUID", b"study\0" + study.encode()
    return "SOPInstanceUID", b"sop\0" + str(ds.get("SOPInstanceUID", "")).encode()


def _snapshot(ds: Any, prefix: tuple[int, ...] = ()) -> dict[tuple[int, ...], str]:
    """Every leaf element's value by its path (tag, item index, tag, ...), pixel data left out."""
    out: dict[tuple[int, ...], str] = {}
    for elem in ds:
        key = (*prefix, int(elem.tag))
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or []):
                out.update(_snapshot(item, (*key, i)))
        elif int(elem.tag) not in _PIXEL_TAGS:
            v = elem.value
            out[key] = hashlib.sha1(bytes(v)).hexdigest() if isinstance(v, bytes | bytearray) else str(v)
    return out


def _vr(tag: int) -> str:
    from pydicom.datadict import dictionary_VR

    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


def _count_private(ds: Any) -> int:
    n = 0
    for elem in ds:
        if elem.tag.is_private:
            n += 1
        elif elem.VR == "SQ":
            n += sum(_count_private(item) for item in elem.value or [])
    return n


@lru_cache(maxsize=1)
def _annex_e() -> tuple[dict[int, str], tuple[tuple[int, int, int, int, str], ...]]:
    """Table E.1-1 (basic profile column) as published by dicom-anonymizer: exact tags and masked (repeating
    group) tags, each with its action code."""
    from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as table

    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for action in ("D", "Z", "X", "U", "Z_D", "X_Z", "X_D", "X_Z_D", "X_Z_U_STAR"):
        for t in getattr(table, f"{action}_TAGS"):
            if len(t) == 2:
                exact[(t[0] << 16) | t[1]] = action
            else:
                masked.append((*t, action))
    return exact, tuple(masked)


def _action(tag: int) -> str | None:
    exact, masked = _annex_e()
    if tag in exact:
        return exact[tag]
    g, e = tag >> 16, tag & 0xFFFF
    return next((a for mg, me, gm, em, a in masked if g & gm == mg and e & em == me), None)


def _apply_annex_e(ds: Any, replaced: set, retain: bool, counts: Counter, prefix: tuple[int, ...] = ()) -> None:
    """Give every element of Table E.1-1 that dicognito did not pseudonymise its basic-profile action."""
    from dicomanonymizer.simpledicomanonymizer import replace_element

    for elem in list(ds):
        tag, key = int(elem.tag), (*prefix, int(elem.tag))
        action = _action(tag)
        if retain and elem.keyword in PATIENT_CHARACTERISTICS:
            _retain_characteristic(ds, elem, counts)
            continue
        if elem.VR == "SQ" and action in (None, "U", "X_Z_U_STAR"):
            for i, item in enumerate(elem.value or []):
                _apply_annex_e(item, replaced, retain, counts, (*key, i))
            continue
        if action is None or action == "U" or (key in replaced and _pseudonym_allowed(action, elem.VR, tag)):
            continue
        if action in ("X", "X_D"):
            del ds[elem.tag]
            counts["tags_removed"] += 1
        elif action == "D" and elem.VR not in ("SQ",):
            try:
                replace_element(elem)
                counts["tags_dummy"] += 1
            except NotImplementedError:
                del ds[elem.tag]
                counts["tags_removed"] += 1
        elif elem.VR == "SQ" and action == "D":
            replace_element(elem)
            counts["tags_dummy"] += 1
        else:  # Z, Z_D, X_Z, X_Z_D: zero length keeps type-2 elements present
            elem.value = [] if elem.VR == "SQ" else None
            counts["tags_emptied"] += 1


def _pseudonym_allowed(action: str, vr: str, tag: int) -> bool:
    """Whether dicognito's replacement satisfies the action: a dummy value does for D and Z (zero length *or* a
    dummy), not for X, except a shifted date or time (the modified-dates option); never for the birth date."""
    return tag not in _BIRTH and (action not in ("X", "X_D") or vr in ("DA", "DT", "TM"))


def _retain_characteristic(ds: Any, elem: Any, counts: Counter) -> None:
    """Keep sex, size and weight; keep an age only in DICOM form (nnnD/W/M/Y), capped at 090Y (HIPAA)."""
    if elem.keyword != "PatientAge":
        return
    m = re.fullmatch(r"(\d{3})([DWMY])", str(elem.value or "").strip().upper())
    if not m:
        del ds[elem.tag]
        counts["tags_removed"] += 1
    elif m[2] == "Y" and int(m[1]) >= 90:
        elem.value = "090Y"
        counts["tags_replaced"] += 1


def _record_method(ds: Any, retain: bool) -> None:
    """DeidentificationMethod (Code Sequence): the profile and options applied, as PS3.15 E.1.1 asks."""
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    names = ["BasicApplicationConfidentialityProfile", "RetainLongitudinalTemporalInformationModifiedDatesOption"]
    items = []
    for name in names + (["RetainPatientCharacteristicsOption"] if retain else []):
        code, item = getattr(codes.DCM, name), Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = items
    old = ds.get("DeidentificationMethod")
    method = [] if old in (None, "") else [str(old)] if isinstance(old, str) else [str(v) for v in old]
    ds.DeidentificationMethod = [*method, "LOUPE: PS3.15 E BASIC PROFILE, MODIFIED DATES"]


def _rebuild_file_meta(ds: Any) -> None:
    """Keep only what identifies the object's class, instance and encoding; the preamble becomes zeros."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    old = ds.file_meta if hasattr(ds, "file_meta") else FileMetaDataset()
    ts = old.get("TransferSyntaxUID")
    if ts is None:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or old.get("MediaStorageSOPClassUID")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID") or old.get("MediaStorageSOPInstanceUID")
    if not meta.MediaStorageSOPClassUID or not meta.MediaStorageSOPInstanceUID:
        raise UnsupportedInputError(
            "the DICOM data set has no SOP Class UID or SOP Instance UID, so it is not a storable object; "
            "re-export it from the PACS or modality"
        )
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    ds.preamble = b"\0" * 128


def _needles(ds: Any) -> list[tuple[str, re.Pattern[str], bool]]:
    """(keyword, whole-word pattern of the original value, is a date) for the identifying elements; IDs and dates
    count from 4 characters, names and places from 6 (shorter ones match ordinary words such as "HERE")."""
    out = []
    for kw in _IDENTIFYING:
        if kw not in ds or ds.get(kw) is None:
            continue
        values = ds.get(kw)
        items = values if type(values).__name__ == "MultiValue" or isinstance(values, list | tuple) else [values]
        shortest = 4 if kw in _ID_LIKE else 6
        for v in items:
            text = str(v).strip().upper()
            for form in {text, " ".join(p for p in text.split("^") if p)}:
                if len(form) >= shortest:
                    out.append((kw, re.compile(rf"(?<!\w){re.escape(form)}(?!\w)"), kw == "PatientBirthDate"))
    return out


def _residual(ds: Any, needles: list[tuple[str, re.Pattern[str], bool]]) -> str:
    """The keyword of an original identifier found in any text element of ``ds`` (file meta included), or ``""``."""
    if not needles:
        return ""
    for container in (ds.file_meta, ds):
        for elem in container.iterall():
            if elem.VR not in _TEXT_VRS and elem.VR not in ("DA", "DT", "TM"):
                continue
            text = str(elem.value).upper()
            for kw, pattern, is_date in needles:
                if pattern.search(text) and not (is_date and elem.VR in ("DA", "DT")):
                    return kw
    return ""
