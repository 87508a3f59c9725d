"""One exception hierarchy for the whole suite.

Every message names the value that was passed, what was expected and how to fix it, so a clinician reading a
batch report or a CLI error can act on it without reading code.
"""

from __future__ import annotations


class LoupeError(Exception):
    """Base of every error Loupe raises on purpose."""


class ConfigError(LoupeError, ValueError):
    """A configuration value or file is invalid; the message lists every problem found."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            msg = f"invalid configuration{where}: {self.problems[0]}"
        else:
            body = "\n".join(f"  - {p}" for p in self.problems)
            msg = f"invalid configuration{where} ({len(self.problems)} problems):\n{body}"
        super().__init__(msg)


class UnknownNameError(LoupeError, LookupError):
    """A name was looked up in a registry (model, preset, label set, recipe, domain) and not found."""

    def __init__(self, kind: str, name: str, known: list[str], suggestions: list[str]):
        self.kind, self.name, self.known, self.suggestions = kind, name, known, suggestions
        hint = f" Did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
        listing = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        super().__init__(
            f"unknown {kind} {name!r}.{hint} Known {kind}s: {listing or '(none registered)'}. "
            f"Run `loupe models` to list everything registered."
        )


class WeightsNotFoundError(LoupeError, FileNotFoundError):
    """A weight file is not where the spec says, and could not be fetched (offline or no network)."""


class WeightsMismatchError(LoupeError):
    """A checkpoint loaded, but its keys or shapes do not fit the model it was meant for."""


class UnsupportedInputError(LoupeError, ValueError):
    """An input file cannot be read: wrong format, missing codec, truncated, or absurd content."""


class MetricInputError(LoupeError, ValueError):
    """Arrays passed to a metric have the wrong shape, length or values."""


class TrackingError(LoupeError):
    """The experiment tracker could not be reached or refused a write."""
