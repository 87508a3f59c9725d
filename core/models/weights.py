"""Weight sources resolved in a fixed order, usable offline, loaded without unpickling code.

Sources: ``hf-hub:org/repo[/file]``, ``local-dir:/path``, ``file:/path.safetensors|.pt|.pth|.bin``, ``tag:NAME``.
A bare path is refused with the prefix to use. Files load with safetensors or ``torch.load(weights_only=True)``.
Layouts ("timm", "open_clip", "mae", "loupe") are converted to the model's keys; every missing or unexpected key
that the layout does not explain is an error, and the explained ones are returned in a `LoadReport`.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from loupe.core.errors import ConfigError, WeightsMismatchError, WeightsNotFoundError
from loupe.core.paths import weights_cache_dir

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
HF_CANDIDATES = (
    "model.safetensors",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
)
SPEC_FILE = "weight_spec.json"
WEIGHTS_FILE = "weights.safetensors"


# --------------------------------------------------------------------------------------------------- resolution
def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or os.environ.get("LOUPE_OFFLINE") == "1"


_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_tag(tag: str) -> str:
    """``tag`` itself when it is a plain name (it becomes a folder of the cache), else a `ConfigError`."""
    if not _TAG.fullmatch(tag or "") or ".." in tag:
        raise ConfigError(
            f"weight tag {tag!r} is not a plain name; use 1-100 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit (a tag names a folder inside the weight cache, so no '/', '..' or spaces)"
        )
    return tag


def tag_path(tag: str) -> Path:
    """Where the cached file of a registered tag lives: ``<weights cache>/<tag>/weights.safetensors``."""
    return weights_cache_dir() / check_tag(tag) / WEIGHTS_FILE


def resolve_source(source: str) -> Path:
    """Turn a weight source into a local file or folder, or raise `WeightsNotFoundError` saying what to do."""
    scheme, sep, rest = source.partition(":")
    if not sep or scheme not in ("hf-hub", "local-dir", "file", "tag") or (len(scheme) == 1 and rest.startswith("\\")):
        hint = "local-dir:" if Path(source).is_dir() else "file:"
        raise ConfigError(
            f"weight source {source!r} has no known prefix; write {hint}{source} for a local path, "
            f"hf-hub:org/repo for the Hugging Face hub, or tag:NAME for a registered tag (`loupe weights list`)"
        )
    if scheme in ("file", "local-dir"):
        p = Path(rest).expanduser()
        if not p.exists():
            raise WeightsNotFoundError(f"weight {scheme} {str(p)!r} does not exist; place the weights there")
        if scheme == "file" and (p.is_dir() or p.suffix not in WEIGHT_SUFFIXES):
            raise ConfigError(f"{source!r} must name a {'/'.join(WEIGHT_SUFFIXES)} file; for a folder use local-dir:")
        if scheme == "local-dir" and not p.is_dir():
            raise ConfigError(f"{source!r} is not a folder; for a single file use file:{rest}")
        return p
    if scheme == "tag":
        p = tag_path(rest)
        if not p.is_file():
            raise WeightsNotFoundError(
                f"weights for tag {rest!r} are not in the cache: expected {p}. "
                f"Run `loupe weights fetch tag:{rest}` where a network exists, or "
                f"`loupe weights import FILE --tag {rest}` to place a copy you have"
            )
        return p
    return _resolve_hf(rest)


def _resolve_hf(ref: str) -> Path:
    parts = ref.split("/")
    repo, files = "/".join(parts[:2]), (["/".join(parts[2:])] if len(parts) > 2 else list(HF_CANDIDATES))
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a dependency
        raise WeightsNotFoundError(f"hf-hub:{ref} needs huggingface_hub: pip install huggingface_hub") from exc
    last: Exception | None = None
    for fname in files:
        try:
            return Path(hf_hub_download(repo, fname, local_files_only=offline()))
        except Exception as exc:  # noqa: BLE001 - hub errors vary by version; the message below says what to do
            last = exc
    cache = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    raise WeightsNotFoundError(
        f"hf-hub:{ref} is not in the local cache ({cache}) and could not be downloaded "
        f"({'offline mode' if offline() else type(last).__name__}). Run `loupe weights fetch hf-hub:{ref}` where a "
        f"network exists, or download {files[0]} yourself and use file:/path/to/{files[0]}"
    )


def find_weights_file(path: Path) -> Path:
    """A file itself, or the weights file inside a folder (``weights.safetensors`` first, then known names)."""
    if path.is_file():
        return path
    for name in (WEIGHTS_FILE, *HF_CANDIDATES, "checkpoint.pth", "checkpoint.pt"):
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    raise WeightsNotFoundError(
        f"no weights file in {str(path)!r}: expected {WEIGHTS_FILE} (or one {'/'.join(WEIGHT_SUFFIXES)} file), "
        f"found {[p.name for p in found] or 'none'}"
    )


# ------------------------------------------------------------------------------------------------------ loading
def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file or a torch checkpoint (``weights_only=True``), unwrapped.

    Wrappers ``state_dict`` / ``model`` / ``module`` (open_clip, MAE, DDP checkpoints) and the ``module.`` key
    prefix are removed.
    """
    p = find_weights_file(Path(path))
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise WeightsMismatchError(f"{p}: not a readable safetensors file ({exc}); re-export the weights") from None
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise WeightsMismatchError(
                f"{p}: refusing to load - the checkpoint holds Python objects beyond tensors "
                f"({_what_was_found(exc)}); loading it could run code. Loupe never unpickles code. Convert it "
                f"to safetensors once, in an isolated environment and only if you trust where it came from: load it "
                f"with torch.load, weights_only switched off, then save_file(state_dict, '{p.stem}.safetensors') from "
                f"safetensors.torch, and use file:{p.stem}.safetensors"
            ) from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise WeightsMismatchError(
                f"{p}: not a readable torch checkpoint ({exc}); the file may be truncated"
            ) from None
        sd = _unwrap(obj, p)
    return _strip_prefix(sd, "module.")


def _what_was_found(exc: BaseException) -> str:
    """The line of torch's long weights-only message that says what was found (``unsupported GLOBAL ...``)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    hit = next((ln for ln in lines if "GLOBAL" in ln or "nsupported" in ln), lines[0] if lines else type(exc).__name__)
    return hit[:200]


def _unwrap(obj: object, p: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj  # type: ignore[return-value]
        if isinstance(obj, dict):
            inner = next((obj[k] for k in ("state_dict", "model", "module", "model_state") if k in obj), None)
            if inner is None:
                break
            obj = inner
    raise WeightsMismatchError(
        f"{p}: no state dict found; expected tensors at the top level or under 'state_dict'/'model', "
        f"got keys {sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__}"
    )


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


# ------------------------------------------------------------------------------------------------- fitting keys
@dataclass
class LoadReport:
    """What a load did: keys the layout explains as missing (new heads) or dropped (MAE decoder), conversions."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    conversions: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.missing)} new (missing) keys, {len(self.unexpected)} dropped keys; " + (
            "; ".join(self.conversions) or "no conversions"
        )


def adapt_vit_keys(sd: dict[str, torch.Tensor], model: nn.Module, report: LoadReport) -> dict[str, torch.Tensor]:
    """Fit ViT weights to a timm ``model``: patch-embed channels (3→1 by summing, 1→3 by repeating), then timm's own
    checkpoint filter for the position table (which knows prefix tokens that carry no position, as in DeiT-3 and
    register-token ViTs) and the patch kernel size."""
    from timm.models import adapt_input_conv
    from timm.models.vision_transformer import checkpoint_filter_fn

    target = model.state_dict()
    out = dict(sd)
    k = "patch_embed.proj.weight"
    if k in out and k in target and out[k].shape[1] != target[k].shape[1]:
        cin, cout = out[k].shape[1], target[k].shape[1]
        out[k] = adapt_input_conv(cout, out[k].float()).to(out[k].dtype)
        report.conversions.append(f"{k}: {cin}→{cout} input channels")
    shapes = {n: tuple(v.shape) for n, v in out.items() if n in ("pos_embed", k)}
    out = checkpoint_filter_fn(out, model)
    for n, old in shapes.items():
        if n in out and tuple(out[n].shape) != old:
            report.conversions.append(f"{n}: resampled {old}→{tuple(out[n].shape)}")
    return out


def load_into(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    *,
    allow_missing: tuple[str, ...] = (),
    allow_unexpected: tuple[str, ...] = (),
    report: LoadReport | None = None,
    source: str = "checkpoint",
) -> LoadReport:
    """Load ``sd`` into ``model``; keys outside the allowed glob patterns, and shape mismatches, raise."""
    report = report or LoadReport()
    target = model.state_dict()
    bad_shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    bad_missing = [k for k in missing if not any(fnmatch.fnmatch(k, p) for p in allow_missing)]
    bad_unexpected = [k for k in unexpected if not any(fnmatch.fnmatch(k, p) for p in allow_unexpected)]
    if bad_shapes or bad_missing or bad_unexpected:
        parts = []
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatches ({'; '.join(bad_shapes[:5])})")
        if bad_missing:
            parts.append(f"{len(bad_missing)} keys the model needs are missing ({', '.join(bad_missing[:8])})")
        if bad_unexpected:
            parts.append(f"{len(bad_unexpected)} keys in the file fit nothing ({', '.join(bad_unexpected[:8])})")
        raise WeightsMismatchError(
            f"{source} does not fit {type(model).__name__}: " + "; ".join(parts) + ". Check the weight spec's "
            "architecture, input_size and layout (timm | open_clip | mae | loupe)"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in target}, strict=False)
    report.missing += missing
    report.unexpected += unexpected
    if missing or unexpected:
        log.info("%s: %d new keys (%s...), %d dropped keys", source, len(missing), missing[:3], len(unexpected))
    return report
