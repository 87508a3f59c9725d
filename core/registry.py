"""Named registries for models, presets, label sets, recipes and domains.

Domains fill these on import; the CLI and the dashboard discover everything through them, so a new domain is a
new folder under ``domains/`` and nothing else. Unknown names fail with the closest matches ("did you mean").
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import logging
import os
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from loupe.core.errors import LoupeError, UnknownNameError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered object with the domain that owns it and free-form metadata (shown by `loupe models`)."""

    name: str
    obj: T
    domain: str = "core"
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A name → object table of one kind ("model", "label set", ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, obj: T, *, domain: str = "core", overwrite: bool = False, **meta: Any) -> T:
        if not overwrite and name in self._entries and self._entries[name].obj is not obj:
            raise LoupeError(
                f"{self.kind} {name!r} is already registered by domain {self._entries[name].domain!r}; "
                f"pick another name or pass overwrite=True"
            )
        self._entries[name] = Entry(name, obj, domain, dict(meta))
        return obj

    def decorator(self, name: str | None = None, *, domain: str = "core", **meta: Any) -> Callable[[T], T]:
        """``@MODELS.decorator("cxr_vit_small_patch16", domain="cxr")`` registers the decorated builder."""

        def wrap(obj: T) -> T:
            return self.register(name or obj.__name__, obj, domain=domain, **meta)

        return wrap

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            known = sorted(self._entries)
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            raise UnknownNameError(self.kind, name, known, close) from None

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def create(self, name: str, **kwargs: Any) -> Any:
        """Call the registered builder ``name`` with ``kwargs``."""
        builder = self.get(name)
        if not callable(builder):
            raise LoupeError(f"{self.kind} {name!r} is not a builder and cannot be created")
        return builder(**kwargs)

    def names(self, pattern: str = "*", domain: str | None = None) -> list[str]:
        return sorted(
            n
            for n, e in self._entries.items()
            if fnmatch.fnmatch(n, pattern) and (domain is None or e.domain == domain)
        )

    def entries(self) -> Iterator[Entry[T]]:
        yield from (self._entries[n] for n in sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


MODELS: Registry[Callable[..., Any]] = Registry("model")
WEIGHTS: Registry[Any] = Registry("weight tag")
PRESETS: Registry[Any] = Registry("preset")
LABEL_SETS: Registry[tuple[str, ...]] = Registry("label set")
RECIPES: Registry[Any] = Registry("recipe")
DOMAINS: Registry[Any] = Registry("domain")
ADAPTERS: Registry[Callable[..., Any]] = Registry("manifest adapter")  # dataset layout → manifest (`loupe data`)

_discovered = False
DOMAINS_PACKAGE = "loupe.domains"


#: Entry-point group through which installed packages add domains (``[project.entry-points."loupe.domains"]``).
ENTRY_POINT_GROUP = "loupe.domains"
#: Comma-separated module names imported as domains too (a domain that is not installed as a package).
PLUGINS_ENV = "LOUPE_PLUGINS"


def discover_domains() -> list[str]:
    """Import every package under ``loupe.domains``, every ``loupe.domains`` entry point and every module named in
    ``LOUPE_PLUGINS`` so that each registers itself; returns the domain names.

    A domain that fails to import is logged and skipped, so one broken domain does not take the CLI down.
    Domains are plugins: core finds them by name at run time and never imports them statically.
    """
    global _discovered
    if not _discovered:
        import loupe.core.models  # noqa: F401 - registers the general-purpose builders

        pkg = importlib.import_module(DOMAINS_PACKAGE)
        names = [i.name for i in pkgutil.iter_modules(pkg.__path__, prefix="loupe.domains.") if i.ispkg]
        names += [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
        for name in names:
            _import_domain(name, lambda n=name: importlib.import_module(n))
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            _import_domain(ep.name, ep.load)
        _discovered = True
    return DOMAINS.names()


def _import_domain(name: str, load: Callable[[], Any]) -> None:
    try:
        load()
    except Exception:  # noqa: BLE001 - a broken optional domain must not break the others
        log.exception("domain %s failed to import and is skipped", name)
