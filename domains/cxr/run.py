"""Entry point for any CXR recipe YAML, in-process or under torchrun (DDP).

    python -m loupe.domains.cxr.run CONFIG.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m loupe.domains.cxr.run CONFIG.yaml [key=value ...]
    python -m loupe.domains.cxr.run --evaluate CONFIG.yaml

Kept apart from the recipe modules so that running it as ``__main__`` does not register the recipes twice.
"""

from __future__ import annotations

import json
import logging
import sys


def cli(argv: list[str] | None = None) -> int:
    from loupe.domains.cxr.finetune import main

    args = list(sys.argv[1:] if argv is None else argv)
    mode = "evaluate" if args[:1] == ["--evaluate"] else "train"
    result = main(args[1:] if mode == "evaluate" else args, mode=mode)
    if result.get("run_id"):
        sys.stdout.write(json.dumps(result, default=str, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(cli())
