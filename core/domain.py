"""What a domain registers about itself: how a file becomes scoring units, how a row becomes a review case, its
demo and its benchmark inputs.

The CLI (``loupe score``, ``loupe demo``, ``loupe bench``) and the dashboard find domains only through `DOMAINS`,
so a new domain is a new folder under ``domains/`` (or an installed plugin, see `loupe.core.registry`) that calls
`register_domain` on import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loupe.core.io.identity import Identity, content_identity
from loupe.core.registry import DOMAINS
from loupe.core.units import UnitReader, single_image_units


@dataclass(frozen=True)
class DomainInfo:
    """A domain's plug-in points; everything but ``name`` and ``description`` has a working default.

    ``read_units(path, spec) -> FileUnits``: one file → its units (default: the whole image, one unit).
    ``unit_table``: write a unit table beside the predictions (domains whose files have many units).
    ``content_identity(path) -> Identity``: how a file is recognised on resume (default: full SHA-256 up to 256 MiB,
    sampled blocks + size + mtime above; see `loupe.core.io.identity`).
    ``meta_keys``: metadata keys the domain's reader adds that are safe to store (the readers' allowlists cover theirs).
    ``review_case(row, units, context) -> ReviewCase``: one predictions row → a review case (default:
    `loupe.core.review.default_case`).
    ``input_suffixes``: file extensions that claim an input of this domain even when their content is broken
    (so they become failed rows instead of vanishing); the image/DICOM ones are always included.
    ``demo_inputs(out_dir) -> folder`` and ``demo_model(work_dir, run=None, fast=False) -> model folder``: the
    domain's part of ``loupe demo`` (inputs from installed packages; cached pretrained weights, else a small model
    trained on data the demo can reach, its spec description saying it is a demo model).
    ``bench_inputs(folder, n) -> list[Path]``: ``n`` realistic inputs for ``loupe bench`` (default: grey PNG films).
    """

    name: str
    description: str
    read_units: UnitReader = single_image_units
    unit_table: bool = False
    content_identity: Callable[[Path], Identity] = content_identity
    meta_keys: tuple[str, ...] = ()
    review_case: Callable[..., Any] | None = None
    input_suffixes: tuple[str, ...] = ()
    demo_inputs: Callable[[Path], Path] | None = None
    demo_model: Callable[..., Path] | None = None
    bench_inputs: Callable[[Path, int], list[Path]] | None = None
    default_model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def register_domain(info: DomainInfo) -> DomainInfo:
    return DOMAINS.register(info.name, info, domain=info.name, description=info.description)
