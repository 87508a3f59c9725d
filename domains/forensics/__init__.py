"""Forensics domain: manipulated faces and pictures. Video clips are sampled into frames and face crops (OpenCV's
bundled Haar detector, offline), pictures are scored whole or by face; unit scores become the clip's score as the
model's spec says, and review cases show the faces on a representative frame with a per-frame timeline."""

from __future__ import annotations

from loupe.core.domain import DomainInfo, register_domain
from loupe.domains.forensics import demo
from loupe.domains.forensics.review import forensics_case
from loupe.domains.forensics.units import META_KEYS, read_units
from loupe.domains.forensics.video import VIDEO_SUFFIXES

register_domain(
    DomainInfo(
        name="forensics",
        description="Face and picture forensics: clips by sampled frames and face crops, pictures whole or by face",
        read_units=read_units,
        unit_table=True,
        meta_keys=META_KEYS,
        review_case=forensics_case,
        input_suffixes=VIDEO_SUFFIXES,
        demo_inputs=demo.demo_inputs,
        demo_model=demo.demo_model,
    )
)

# recipes register themselves on import
from loupe.domains.forensics import detect, localize, video_eval  # noqa: E402, F401
