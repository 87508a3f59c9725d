"""Input handling shared by the metric modules: tensors to numpy, label masking, validation."""

from __future__ import annotations

from typing import Any

import numpy as np

from loupe.core.errors import MetricInputError

__all__ = ["MetricInputError"]


def to_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a float64 numpy array; torch tensors are detached and moved to CPU (no torch import)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MetricInputError(f"{name} must be numeric array-like, got {type(x).__name__}: {exc}") from exc


def as_1d(x: Any, name: str) -> np.ndarray:
    """Float64 vector from ``x``; a (N, 1) column is accepted and flattened, anything else 2-D is refused."""
    a = to_numpy(x, name)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise MetricInputError(f"{name} must be 1-D (one label), got shape {a.shape}; pass one column at a time")
    return a


def as_2d(x: Any, name: str) -> np.ndarray:
    """Float64 (N, L) matrix from ``x``; a vector becomes one column."""
    a = to_numpy(x, name)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise MetricInputError(f"{name} must be (N, L) = samples x labels, got shape {a.shape}")
    return a


def check_same_shape(y: np.ndarray, s: np.ndarray, y_name: str = "y", s_name: str = "s") -> None:
    if y.shape != s.shape:
        raise MetricInputError(f"{y_name} has shape {y.shape} but {s_name} has shape {s.shape}; they must match")


def masked_binary(y: Any, s: Any) -> tuple[np.ndarray, np.ndarray]:
    """Drop samples whose label is NaN (unknown) and check the rest.

    Args:
        y: labels, (N,), values 1 / 0 / NaN.
        s: scores, (N,), any real scale (probabilities or logits); must be finite where the label is known.

    Returns:
        ``(y_known, s_known)``: labels as 0/1 floats and their scores.
    """
    y, s = as_1d(y, "y"), as_1d(s, "s")
    check_same_shape(y, s)
    known = ~np.isnan(y)
    y, s = y[known], s[known]
    bad = (y != 0) & (y != 1)
    if bad.any():
        raise MetricInputError(
            f"labels must be 1, 0 or NaN (unknown), got {np.unique(y[bad])[:5].tolist()}; "
            "map uncertain labels to NaN or 0/1 before scoring"
        )
    if not np.isfinite(s).all():
        raise MetricInputError(
            f"{int((~np.isfinite(s)).sum())} scores are NaN/inf where the label is known; "
            "a failed prediction must be dropped or its label set to NaN"
        )
    return y, s


def label_names_for(n_labels: int, label_names: Any) -> list[str]:
    """Names for L label columns; defaults to ``label_0 ... label_{L-1}``."""
    if label_names is None:
        return [f"label_{i}" for i in range(n_labels)]
    names = [str(n) for n in label_names]
    if len(names) != n_labels:
        raise MetricInputError(f"got {len(names)} label names for {n_labels} label columns: {names}")
    return names


def nan_mean(values: Any) -> float:
    """Mean ignoring NaN; NaN (no warning) when every value is NaN or there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")
