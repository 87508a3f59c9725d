"""The forensics unit reader: pictures and video clips → what a forensic model scores.

- A **picture** (PNG / JPEG / TIFF / DICOM, read by content through `loupe.core.io.read_any`) is one unit of kind
  ``image``, the whole picture as the weight spec prepares it (a spec with ``resize_mode="center_crop"`` sees its
  central pixels unresampled); with ``faces=true``, or for a model whose scope needs a face
  (``{"face_found": true}``), each face found is a unit of kind ``face`` instead.
- A **video** (MP4 / MOV / AVI / MKV / WebM, told by content, else by extension) is sampled (`video.sample_indices`);
  each face in a sampled frame is a unit of kind ``face`` with its ``frame_index``, ``time_s``, ``box`` (the face)
  and ``region`` (its square crop with a margin, in the frame's pixels); a sampled frame without a face is an
  ``excluded`` unit ("no face found"), one that does not decode a ``failed`` unit. With ``faces=false`` each sampled
  frame is a unit of kind ``frame``. The file's artifact is a ``thumbnail``: the frame with the largest face (the
  middle sampled frame for whole frames), for the reviewer.

A unit's ``region`` is what the model sees: the crop (or picture) itself for ``squash`` specs, its centre part for
cropping specs (`loupe.core.units.input_region`), so unit maps land where they belong. With ``align=true`` each
face's eyes are searched (`faces.find_eyes`) and its crop rotated so they are level (`faces.rotated_crop`): the
unit's ``region`` stays the same square in the frame, its pixels (and any map the model makes of them) are rotated
counter-clockwise by the unit's ``rotation_deg`` about the square's centre; the unit's metadata records
``eyes_found``, ``eye_angle_deg`` and ``rotation_deg`` (0 when no eyes were found: the crop is then unaligned), and
the file's ``faces_with_eyes`` counts the faces whose eyes were found. Faces (and eyes) are found before any unit
is handed out, so the file's metadata can say whether there is one (a model's scope may require it); crops are then
re-read frame by frame, so memory stays at one frame per clip.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from loupe.core.errors import ConfigError
from loupe.core.io import read_any, sniff_bytes
from loupe.core.io.common import input_error, unreadable
from loupe.core.models.spec import WeightSpec
from loupe.core.units import FileArtifact, FileUnits, Region, Unit, UnitFailure, UnitInfo, input_region
from loupe.domains.forensics.faces import (
    Face,
    FaceConfig,
    detect_faces,
    rotated_crop,
    rotation_for,
    square_crop,
    with_eyes,
)
from loupe.domains.forensics.video import (
    MAX_SAMPLES,
    VIDEO_SUFFIXES,
    VideoInfo,
    probe,
    read_frames,
    sample_indices,
    sniff_video,
)

log = logging.getLogger(__name__)

NO_FACE = "no face found"
#: The reviewer's thumbnail of a clip is at most this many pixels on its longer side.
THUMB_SIDE = 1024
#: Metadata keys this reader adds (all non-identifying: sizes, rates, counts; no path, no container tags).
META_KEYS = ("container", "codec", "width", "height", "fps", "frame_count", "duration_s", "every_s",
             "frames_sampled", "frames_decoded", "frames_with_face", "faces_found", "face_found",
             "units_from", "align", "faces_with_eyes")  # fmt: skip
_FACE_FIX = (
    "check that it shows a frontal face (the Haar detector misses profiles and strongly turned heads), lower "
    "--option min_face=PIXELS for small faces, or score whole {what} with --option faces=false"
)


@dataclass(frozen=True)
class ForensicsOptions:
    """Unit options (``loupe score forensics --option key=value``, a spec's ``unit_options``).

    ``frames``: frames sampled per clip, evenly spread (1..`MAX_SAMPLES`); ``every_s``: one frame every so many
    seconds instead; ``max_faces``: the largest N faces per frame or picture, 0 = all; ``margin``: fraction of a
    face box added on each side of its crop; ``min_face``: smallest face side in pixels; ``faces``: crop faces
    (default: yes for videos, no for pictures unless the model's scope needs a face); ``align``: rotate each face
    crop so its eyes are level (off by default: rotating resamples the pixels; see `faces`)."""

    frames: int = 8
    every_s: float | None = None
    max_faces: int = 0
    margin: float = 0.2
    min_face: int = 40
    faces: bool | None = None
    align: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> ForensicsOptions:
        """Validated options; unknown keys and wrong types are refused with what is known / expected."""
        opts = dict(options or {})
        known = sorted(f.name for f in fields(cls))
        bad = sorted(set(opts) - set(known))
        if bad:
            raise ConfigError(f"unknown forensics unit option(s) {bad}; known: {known}")
        problems = [p for k, v in opts.items() if (p := _type_problem(k, v))]
        if problems:
            raise ConfigError(problems, source="forensics unit options")
        cfg = cls(**opts)
        problems = cfg.face.problems()
        if not 1 <= cfg.frames <= MAX_SAMPLES:
            problems.append(f"frames must be in [1, {MAX_SAMPLES}], got {cfg.frames}")
        if cfg.every_s is not None and not cfg.every_s > 0:
            problems.append(f"every_s must be > 0 seconds, got {cfg.every_s}")
        if problems:
            raise ConfigError(problems, source="forensics unit options")
        return cfg

    @property
    def face(self) -> FaceConfig:
        return FaceConfig(min_face=self.min_face, max_faces=self.max_faces, margin=self.margin)


def _type_problem(key: str, value: Any) -> str | None:
    if key == "faces":
        ok, want = value is None or isinstance(value, bool), "true or false"
    elif key == "align":
        ok, want = isinstance(value, bool), "true or false"
    elif key in ("frames", "max_faces", "min_face"):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif key == "every_s":
        ok, want = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)), "seconds"
    else:
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    return None if ok else f"{key} must be {want}, got {value!r}"


def needs_face(spec: WeightSpec) -> bool:
    """Whether ``spec``'s scope requires a face (``{"face_found": true}``)."""
    return spec.scope.get("face_found") is True


def read_units(path: Path, spec: WeightSpec, options: dict[str, Any] | None = None) -> FileUnits:
    """The forensics domain's unit reader; see the module docstring."""
    cfg = ForensicsOptions.from_options(options)
    if cfg.faces is False and needs_face(spec):
        raise ConfigError(
            f"unit option faces=false contradicts model {spec.name!r}, whose scope needs a face (face_found: true); "
            f"drop --option faces=false, or score whole frames with a model made for them"
        )
    p = Path(path)
    if is_video(p):
        return video_units(p, spec, cfg, faces=cfg.faces is not False)
    return image_units(p, spec, cfg, faces=bool(cfg.faces) or needs_face(spec))


def is_video(path: Path) -> bool:
    """A video by its first bytes (MP4 / MOV / AVI / Matroska); by its extension when they say neither a video nor
    an image (a damaged or empty clip still gets the video reader's errors)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise unreadable(path, exc) from exc
    if head and sniff_bytes(head) != "unknown":
        return False
    return sniff_video(head) is not None or path.suffix.lower() in VIDEO_SUFFIXES


# --------------------------------------------------------------------------------------------------- pictures
def image_units(path: Path, spec: WeightSpec, cfg: ForensicsOptions, faces: bool) -> FileUnits:
    """One picture: the whole of it, or its faces."""
    img = read_any(path)
    array = img.array[0] if img.array.ndim >= 3 and img.meta.get("frames", 1) > 1 else img.array
    h, w = int(array.shape[0]), int(array.shape[1])
    bits = img.meta.get("bits_stored") or img.meta.get("bit_depth")
    meta = dict(img.meta)
    if not faces:
        info = UnitInfo(index=0, kind="image", region=input_region(spec, h, w))
        return FileUnits(meta | {"units_from": "image"}, {"width": w, "height": h},
                         _image_unit(array, bits, spec, info))  # fmt: skip
    found = detect_faces(array, cfg.face, bits)
    if not found:
        raise input_error(path, f"{NO_FACE} in the picture (faces of at least {cfg.min_face} px)",
                          _FACE_FIX.format(what="pictures"))  # fmt: skip
    meta |= {"units_from": "faces", "faces_found": len(found), "face_found": True}
    if cfg.align:
        found = with_eyes(array, found, bits)
        meta |= {"align": True, "faces_with_eyes": sum(f.eyes is not None for f in found)}
    return FileUnits(meta, {"width": w, "height": h}, _face_units(array, bits, spec, cfg, found, 0, None, None))


def _image_unit(array: np.ndarray, bits: int | None, spec: WeightSpec, info: UnitInfo) -> Iterator[Unit]:
    from loupe.core.transforms import ModelInput

    yield Unit(ModelInput(spec)(array, bits), info)


def _face_units(
    frame: np.ndarray,
    bits: int | None,
    spec: WeightSpec,
    cfg: ForensicsOptions,
    found: list[Face],
    first: int,
    frame_index: int | None,
    time_s: float | None,
) -> Iterator[Unit]:
    """The units of ``found`` faces in ``frame`` (``[H, W]`` / ``[H, W, C]``), numbered from ``first``."""
    from loupe.core.transforms import ModelInput

    prep = ModelInput(spec)
    h, w = frame.shape[:2]
    for rank, face in enumerate(found):
        square = square_crop(face.box, w, h, cfg.margin)
        meta: dict[str, Any] = {"face_score": face.score, "face_rank": rank, "crop": list(square)}
        turn = 0.0
        if cfg.align:
            turn = rotation_for(face.eyes)
            meta |= {"eyes_found": face.eyes is not None, "rotation_deg": turn,
                     "eye_angle_deg": round(face.eyes.angle_deg, 2) if face.eyes else None}  # fmt: skip
        info = UnitInfo(index=first + rank, kind="face", region=_seen(spec, square), frame_index=frame_index,
                        time_s=time_s, box=face.box, meta=meta)  # fmt: skip
        yield Unit(prep(rotated_crop(frame, square, turn), bits), info)


def _seen(spec: WeightSpec, square: Region) -> Region:
    """The part of the crop ``square`` (in frame pixels) that the spec's resize shows the model."""
    x, y, w, h = square
    dx, dy, cw, ch = input_region(spec, h, w)
    return x + dx, y + dy, cw, ch


# ------------------------------------------------------------------------------------------------------ videos
def video_units(path: Path, spec: WeightSpec, cfg: ForensicsOptions, faces: bool) -> FileUnits:
    """One clip: faces in its sampled frames (or the frames themselves), with a thumbnail for the reviewer."""
    info = probe(path)
    indices = sample_indices(info, cfg.frames, cfg.every_s, path)
    meta = info.meta() | {"frames_sampled": len(indices), "every_s": cfg.every_s}
    frame = {"width": info.width, "height": info.height}
    if not faces:
        artifacts = []
        with contextlib.closing(read_frames(path, [indices[len(indices) // 2]])) as it:
            fi, first = next(it)
        if not isinstance(first, str):
            artifacts.append(_thumbnail(first, info, fi))
        return FileUnits(meta | {"units_from": "frames"}, frame, _frame_units(path, spec, info, indices), artifacts)
    plan, thumb = _find_faces(path, info, indices, cfg)
    decoded = [f for _, f in plan if not isinstance(f, str)]
    if not decoded:
        fix = "re-export or re-download the clip (e.g. `ffmpeg -i in.mp4 -c:v libx264 out.mp4`)"
        raise input_error(path, f"none of the {len(indices)} sampled frames decodes ({plan[0][1]})", fix)
    with_face = [f for f in decoded if f]
    if not with_face:
        raise input_error(path, f"{NO_FACE} in any of the {len(indices)} sampled frames (faces of at least "
                          f"{cfg.min_face} px)", _FACE_FIX.format(what="frames"))  # fmt: skip
    meta |= {"units_from": "faces", "frames_decoded": len(decoded), "frames_with_face": len(with_face),
             "faces_found": sum(len(f) for f in with_face), "face_found": True}  # fmt: skip
    if cfg.align:
        meta |= {"align": True, "faces_with_eyes": sum(f.eyes is not None for fs in with_face for f in fs)}
    return FileUnits(meta, frame, _video_face_units(path, spec, info, cfg, plan), [thumb] if thumb else [])


def _find_faces(
    path: Path, info: VideoInfo, indices: list[int], cfg: ForensicsOptions
) -> tuple[list[tuple[int, list[Face] | str]], FileArtifact | None]:
    """Per sampled frame: its faces (largest first; [] when none) or why it did not decode; and the thumbnail of
    the frame with the largest face."""
    plan: list[tuple[int, list[Face] | str]] = []
    best: tuple[int, FileArtifact] | None = None
    with contextlib.closing(read_frames(path, indices)) as frames:
        for fi, frame in frames:
            if isinstance(frame, str):
                plan.append((fi, frame))
                continue
            found = detect_faces(frame, cfg.face)
            if cfg.align:  # eyes found now, on the frame in hand, so the file's metadata can count them
                found = with_eyes(frame, found)
            plan.append((fi, found))
            if found and (best is None or found[0].area > best[0]):
                best = (found[0].area, _thumbnail(frame, info, fi))
    return plan, (best[1] if best else None)


def _video_face_units(
    path: Path, spec: WeightSpec, info: VideoInfo, cfg: ForensicsOptions, plan: list[tuple[int, list[Face] | str]]
) -> Iterator[Unit | UnitFailure]:
    """Units in frame order: the faces of each sampled frame (re-read now, one frame in memory at a time), an
    ``excluded`` unit for a frame without a face, a ``failed`` one for a frame that did not decode."""
    whole = (0, 0, info.width, info.height)
    wanted = [fi for fi, found in plan if isinstance(found, list) and found]
    k = 0
    with contextlib.closing(read_frames(path, wanted)) as frames:
        for fi, found in plan:
            t = info.time_of(fi)
            if isinstance(found, str) or not found:
                reason, status = (found, "failed") if isinstance(found, str) else (NO_FACE, "excluded")
                yield UnitFailure(reason, UnitInfo(index=k, kind="frame", region=whole, frame_index=fi, time_s=t),
                                  status)  # fmt: skip
                k += 1
                continue
            got, frame = next(frames)
            assert got == fi, (got, fi)  # read_frames yields exactly the indices asked, in order
            if isinstance(frame, str):  # decoded on the first pass, not on this one
                for face in found:
                    info = UnitInfo(index=k, kind="face", frame_index=fi, time_s=t, box=face.box)
                    yield UnitFailure(f"{frame} (on re-reading the frame)", info)
                    k += 1
                continue
            yield from _face_units(frame, None, spec, cfg, found, k, fi, t)
            k += len(found)


def _frame_units(path: Path, spec: WeightSpec, info: VideoInfo, indices: list[int]) -> Iterator[Unit | UnitFailure]:
    """Whole sampled frames as units (``faces=false``)."""
    from loupe.core.transforms import ModelInput

    prep = ModelInput(spec)
    with contextlib.closing(read_frames(path, indices)) as frames:
        for k, (fi, frame) in enumerate(frames):
            t = info.time_of(fi)
            if isinstance(frame, str):
                whole = (0, 0, info.width, info.height)
                yield UnitFailure(frame, UnitInfo(index=k, kind="frame", region=whole, frame_index=fi, time_s=t))
                continue
            region = input_region(spec, frame.shape[0], frame.shape[1])
            yield Unit(prep(frame), UnitInfo(index=k, kind="frame", region=region, frame_index=fi, time_s=t))


def _thumbnail(frame: np.ndarray, info: VideoInfo, frame_index: int) -> FileArtifact:
    """``frame`` (RGB uint8) at most `THUMB_SIDE` pixels on its longer side, placed on the clip's frame."""
    import cv2

    h, w = frame.shape[:2]
    scale = min(1.0, THUMB_SIDE / max(h, w))
    if scale < 1.0:
        frame = cv2.resize(frame, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    placed = {"space": "file", "scale": frame.shape[1] / w, "frame_index": frame_index,
              "time_s": info.time_of(frame_index)}  # fmt: skip
    return FileArtifact("thumbnail", np.ascontiguousarray(frame), placed)
