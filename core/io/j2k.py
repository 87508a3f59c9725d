"""JPEG 2000 decoding at a reduced resolution level, through OpenJPEG's own C API.

A JPEG 2000 codestream holds its image as a wavelet pyramid: resolution level ``k`` (1/2^k of each side) is
decoded from the low-pass bands alone, without touching the bytes of the finer levels, which is where a lossless
radiograph keeps most of them. pydicom's decoders and pylibjpeg-openjpeg always decode every level, and Pillow's
``reduce`` mis-sizes images whose sides are not multiples of 2^k (it rounds, OpenJPEG rounds up), so this module
calls ``opj_set_decoded_resolution_factor`` of the OpenJPEG library that Pillow ships (or the system's) directly.

`decode(codestream, level)` returns the samples exactly as stored (``int32``, one 2-D array per component) at
that level, after checking the reduced size against a memory budget; `available()` says whether the library was
found (readers fall back to a full decode otherwise, and say so in their pipeline).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_J2K, _JP2 = 0, 2  # OPJ_CODEC_FORMAT
_PARAMS_BYTES = 1 << 15  # opj_dparameters_t is ~8.3 KB; OpenJPEG fills it, we never read it


class _Comp(ctypes.Structure):  # opj_image_comp_t (OpenJPEG >= 2.1)
    _fields_ = [
        ("dx", ctypes.c_uint32),
        ("dy", ctypes.c_uint32),
        ("w", ctypes.c_uint32),
        ("h", ctypes.c_uint32),
        ("x0", ctypes.c_uint32),
        ("y0", ctypes.c_uint32),
        ("prec", ctypes.c_uint32),
        ("bpp", ctypes.c_uint32),
        ("sgnd", ctypes.c_uint32),
        ("resno_decoded", ctypes.c_uint32),
        ("factor", ctypes.c_uint32),
        ("data", ctypes.POINTER(ctypes.c_int32)),
        ("alpha", ctypes.c_uint16),
    ]


class _Image(ctypes.Structure):  # opj_image_t
    _fields_ = [
        ("x0", ctypes.c_uint32),
        ("y0", ctypes.c_uint32),
        ("x1", ctypes.c_uint32),
        ("y1", ctypes.c_uint32),
        ("numcomps", ctypes.c_uint32),
        ("color_space", ctypes.c_int),
        ("comps", ctypes.POINTER(_Comp)),
        ("icc_profile_buf", ctypes.c_void_p),
        ("icc_profile_len", ctypes.c_uint32),
    ]


_READ = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_SKIP = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_SEEK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)
_MSG = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_void_p)


class J2KError(Exception):
    """OpenJPEG refused the codestream (its own message) or the decode would exceed the budget."""


@dataclass(frozen=True)
class Header:
    """What a codestream's main header says: ``rows`` x ``columns`` (image area), ``components``, ``precision``
    (bits), ``signed``, ``levels`` (wavelet decompositions, the deepest reduction available)."""

    rows: int
    columns: int
    components: int
    precision: int
    signed: bool
    levels: int


def _candidates() -> list[str]:
    import PIL

    here = Path(PIL.__file__).parent
    found = sorted(glob.glob(str(here.parent / "pillow.libs" / "libopenjp2*.so*")))  # Linux wheels
    found += sorted(glob.glob(str(here / ".dylibs" / "libopenjp2*.dylib")))  # macOS wheels
    system = ctypes.util.find_library("openjp2")
    return found + ([system] if system else [])


@functools.cache
def _lib() -> ctypes.CDLL | None:
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
            lib.opj_set_decoded_resolution_factor  # noqa: B018 - OpenJPEG >= 2.0; absent means an unusable build
        except (OSError, AttributeError):
            continue
        _declare(lib)
        return lib
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p = ctypes.c_void_p
    sigs = {
        "opj_version": (ctypes.c_char_p, []),
        "opj_create_decompress": (p, [ctypes.c_int]),
        "opj_set_default_decoder_parameters": (None, [p]),
        "opj_setup_decoder": (ctypes.c_int, [p, p]),
        "opj_set_error_handler": (ctypes.c_int, [p, _MSG, p]),
        "opj_set_warning_handler": (ctypes.c_int, [p, _MSG, p]),
        "opj_read_header": (ctypes.c_int, [p, p, ctypes.POINTER(ctypes.POINTER(_Image))]),
        "opj_set_decoded_resolution_factor": (ctypes.c_int, [p, ctypes.c_uint32]),
        "opj_decode": (ctypes.c_int, [p, p, ctypes.POINTER(_Image)]),
        "opj_end_decompress": (ctypes.c_int, [p, p]),
        "opj_image_destroy": (None, [ctypes.POINTER(_Image)]),
        "opj_destroy_codec": (None, [p]),
        "opj_stream_create": (p, [ctypes.c_size_t, ctypes.c_int]),
        "opj_stream_destroy": (None, [p]),
        "opj_stream_set_read_function": (None, [p, _READ]),
        "opj_stream_set_skip_function": (None, [p, _SKIP]),
        "opj_stream_set_seek_function": (None, [p, _SEEK]),
        "opj_stream_set_user_data": (None, [p, p, p]),
        "opj_stream_set_user_data_length": (None, [p, ctypes.c_uint64]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def available() -> bool:
    """Whether an OpenJPEG library with reduced-resolution decoding was found."""
    return _lib() is not None


def version() -> str | None:
    lib = _lib()
    return lib.opj_version().decode() if lib is not None else None


def levels(codestream: bytes) -> int | None:
    """Decomposition levels of a raw codestream's COD segment (ISO/IEC 15444-1 A.6.1), None when not found."""
    offset = 2  # after SOC
    while offset + 4 <= len(codestream) and codestream[offset] == 0xFF:
        marker, length = codestream[offset + 1], int.from_bytes(codestream[offset + 2 : offset + 4], "big")
        if marker == 0x52 and offset + 9 < len(codestream):  # COD: Lcod, Scod, SGcod (4 bytes), SPcod[0] = levels
            return codestream[offset + 9]
        if marker in (0x90, 0x93) or length < 2:  # SOT / SOD: the main header is over
            return None
        offset += 2 + length
    return None


class _Stream:
    """An OpenJPEG input stream over bytes in memory (its callbacks kept alive as long as the stream)."""

    def __init__(self, lib: ctypes.CDLL, data: bytes):
        self.lib, self.data, self.pos = lib, data, 0
        self.read, self.skip, self.seek = _READ(self._read), _SKIP(self._skip), _SEEK(self._seek)
        self.handle = lib.opj_stream_create(1 << 20, 1)
        if not self.handle:
            raise J2KError("OpenJPEG could not create a stream")
        lib.opj_stream_set_read_function(self.handle, self.read)
        lib.opj_stream_set_skip_function(self.handle, self.skip)
        lib.opj_stream_set_seek_function(self.handle, self.seek)
        lib.opj_stream_set_user_data(self.handle, None, None)
        lib.opj_stream_set_user_data_length(self.handle, len(data))

    def _read(self, buf: int, n: int, _: int) -> int:
        if self.pos >= len(self.data):
            return ctypes.c_size_t(-1).value  # OpenJPEG's end of stream
        chunk = self.data[self.pos : self.pos + n]
        ctypes.memmove(buf, chunk, len(chunk))
        self.pos += len(chunk)
        return len(chunk)

    def _skip(self, n: int, _: int) -> int:
        step = max(-self.pos, min(n, len(self.data) - self.pos))
        self.pos += step
        return step

    def _seek(self, n: int, _: int) -> int:
        if not 0 <= n <= len(self.data):
            return 0
        self.pos = n
        return 1

    def close(self) -> None:
        if self.handle:
            self.lib.opj_stream_destroy(self.handle)
            self.handle = None


class _Decoder:
    """One decompression: codec + stream + image, destroyed together, OpenJPEG's messages collected."""

    def __init__(self, data: bytes):
        lib = _lib()
        if lib is None:
            raise J2KError("no OpenJPEG library with reduced-resolution decoding was found")
        self.lib, self.errors = lib, []
        # the callbacks live as long as the decoder: OpenJPEG calls them until the codec is destroyed
        self.on_error = _MSG(lambda msg, _: self.errors.append(msg.decode(errors="replace").strip()))
        self.on_warning = _MSG(lambda msg, _: None)
        self.codec = lib.opj_create_decompress(_JP2 if data[4:8] == b"jP  " else _J2K)
        self.stream = _Stream(lib, data)
        self.image = ctypes.POINTER(_Image)()
        params = ctypes.create_string_buffer(_PARAMS_BYTES)
        lib.opj_set_default_decoder_parameters(params)
        lib.opj_set_error_handler(self.codec, self.on_error, None)
        lib.opj_set_warning_handler(self.codec, self.on_warning, None)
        self._check(lib.opj_setup_decoder(self.codec, params), "set up the decoder")

    def _check(self, ok: int, what: str) -> None:
        if not ok:
            raise J2KError(f"OpenJPEG could not {what}: {'; '.join(self.errors[-3:]) or 'no reason given'}")

    def header(self) -> Header:
        self._check(
            self.lib.opj_read_header(self.stream.handle, self.codec, ctypes.byref(self.image)), "read the header"
        )
        img = self.image.contents
        comp = img.comps[0]
        n = levels(self.stream.data)
        return Header(int(img.y1 - img.y0), int(img.x1 - img.x0), int(img.numcomps), int(comp.prec), bool(comp.sgnd),
                      5 if n is None else int(n))  # fmt: skip

    def decode(self, level: int) -> list[np.ndarray]:
        if level:
            self._check(self.lib.opj_set_decoded_resolution_factor(self.codec, level), f"reduce by 2^{level}")
        self._check(self.lib.opj_decode(self.codec, self.stream.handle, self.image), "decode the codestream")
        self._check(self.lib.opj_end_decompress(self.codec, self.stream.handle), "finish decoding")
        img = self.image.contents
        out = []
        for i in range(img.numcomps):
            c = img.comps[i]
            if not c.data:
                raise J2KError(f"OpenJPEG returned no samples for component {i}")
            flat = np.ctypeslib.as_array(c.data, shape=(int(c.h) * int(c.w),))
            out.append(flat.reshape(int(c.h), int(c.w)).copy())  # copied before the image is destroyed
        return out

    def close(self) -> None:
        if self.image:
            self.lib.opj_image_destroy(self.image)
        self.stream.close()
        if self.codec:
            self.lib.opj_destroy_codec(self.codec)


def read_header(codestream: bytes) -> Header:
    """The main header of ``codestream`` (no sample is decoded)."""
    dec = _Decoder(codestream)
    try:
        return dec.header()
    finally:
        dec.close()


def decode(codestream: bytes, level: int, budget: int | None = None) -> tuple[list[np.ndarray], Header]:
    """The components of ``codestream`` at reduction ``level`` (1/2^level of each side, rounded up), ``int32``
    samples as stored; and its header. ``budget`` (bytes): refuse before decoding when OpenJPEG's buffers at that
    level (about 8 bytes per sample: its ``int32`` image and tile buffers) would exceed it."""
    dec = _Decoder(codestream)
    try:
        head = dec.header()
        if not 0 <= level <= head.levels:
            raise J2KError(f"level {level} is not available: the codestream has {head.levels} wavelet levels")
        rows, cols = -(-head.rows // (1 << level)), -(-head.columns // (1 << level))
        need = rows * cols * head.components * 8
        if budget is not None and need > budget:
            raise J2KError(
                f"decoding {head.rows}x{head.columns} at 1/{1 << level} ({rows}x{cols}) needs about "
                f"{need / 2**20:.0f} MiB, more than the budget of {budget / 2**20:.0f} MiB"
            )
        return dec.decode(level), head
    finally:
        dec.close()


__all__ = ["Header", "J2KError", "available", "decode", "levels", "read_header", "version"]
