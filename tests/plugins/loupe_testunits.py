"""A domain defined by the test suite only (never shipped), proving the scoring contracts before real domains use
them: each image is cut into a 2 x 2 grid of tile units (regions in image pixels), an image whose name holds
``badtile`` has its second tile fail, and the model it is scored with returns scores and a pixel mask. Hostile
readers for the trust tests: an image whose name holds ``segfault`` kills its reader process half-way through its
tiles (what a crashing C decoder does), one whose name holds ``spin`` loops forever on its third tile.

Loaded as a plugin (``LOUPE_PLUGINS=loupe_testunits`` with ``tests/plugins`` on ``PYTHONPATH``), the way an
installed third-party domain would be, so subprocesses and Ray actors find it too.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from loupe.core.domain import DomainInfo, register_domain
from loupe.core.io import read_any
from loupe.core.models import WeightSpec
from loupe.core.transforms import ModelInput
from loupe.core.units import FileUnits, Unit, UnitFailure, UnitInfo

NAME = "testunits"
GRID = 2


def read_tiles(path: Path, spec: WeightSpec, options: dict | None = None) -> FileUnits:
    img = read_any(path)
    array = img.array
    h, w = array.shape[:2]
    th, tw = h // GRID, w // GRID
    bits = img.meta.get("bits_stored") or img.meta.get("bit_depth")
    prep = ModelInput(spec)

    def units():
        for i in range(GRID * GRID):
            r, c = divmod(i, GRID)
            info = UnitInfo(i, "tile", (c * tw, r * th, tw, th), level=0, meta={"row": r, "col": c})
            if "segfault" in path.name and i == 2:
                os.kill(os.getpid(), signal.SIGSEGV)
            if "spin" in path.name and i == 2:
                while True:  # a decoder stuck in a loop: only the read deadline ends it
                    pass
            if "badtile" in path.name and i == 1:
                yield UnitFailure("tile 1 cannot be read (planted by the test)", info)
                continue
            yield Unit(prep(array[r * th : (r + 1) * th, c * tw : (c + 1) * tw], bits), info)

    return FileUnits(meta={**img.meta, "tiles": GRID * GRID}, frame={"width": w, "height": h}, units=units())


def mask_spec(**changes) -> WeightSpec:
    base = WeightSpec(
        name="tiles-and-mask",
        architecture="vit_micro_patch8",
        input_size=(1, 32, 32),
        mean=(0.5,),
        std=(0.25,),
        label_names=("Lesion", "Artefact"),
        thresholds={"Lesion": 0.4},
        unit_thresholds={"Lesion": 0.6},
        outputs=("scores", "mask"),
        aggregation="max",
        model_kwargs={"head": "mask"},
        domain=NAME,
        version="3",
    )
    return base.replace(**changes)


register_domain(
    DomainInfo(
        name=NAME,
        description="test domain: 2x2 tiles per image, scores and a mask",
        read_units=read_tiles,
        unit_table=True,
        meta_keys=("tiles",),
    )  # fmt: skip
)
