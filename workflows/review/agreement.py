"""What the reviews add up to: agreement between the model and each reviewer and between reviewers (Cohen's κ),
and the reviewed cases as a manifest for the next fine-tune (labels 1 / 0 where the reviewers agree, empty where
they do not or did not decide)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

import pandas as pd

from loupe.core.review import ReviewCase
from loupe.workflows.review.store import ABSENT, PRESENT, ReviewStore, model_value


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's κ of two raters over the same items (NaN when it is undefined: no items, or chance agreement 1)."""
    from sklearn.metrics import cohen_kappa_score

    if not a:
        return math.nan
    labels = sorted(set(a) | set(b))
    if len(labels) < 2:
        return math.nan  # one value everywhere: agreement is perfect by chance, κ has no meaning
    return float(cohen_kappa_score(list(a), list(b), labels=labels))


def _pair(name_a: str, name_b: str, a: list[str], b: list[str]) -> dict[str, object]:
    agree = sum(x == y for x, y in zip(a, b, strict=True))
    return {"rater_a": name_a, "rater_b": name_b, "n": len(a), "agreement": agree / len(a) if a else math.nan,
            "kappa": cohen_kappa(a, b)}  # fmt: skip


def agreement_table(cases: Sequence[ReviewCase], store: ReviewStore) -> pd.DataFrame:
    """One row per rater pair — the model vs each reviewer, each reviewer pair — over the findings both judged:
    ``n``, raw ``agreement`` and Cohen's ``kappa``."""
    decided = {}
    for domain in {c.domain for c in cases}:
        decided |= {(domain, *k): v for k, v in store.decisions(domain).items()}
    model: dict[tuple[str, str, str], str] = {}
    for c in cases:
        for f in c.findings:
            model[(c.domain, c.case_id, f.label)] = model_value(f.decision)
    reviewers = sorted({r for v in decided.values() for r in v})
    rows = []
    for r in reviewers:
        keys = [k for k, v in decided.items() if r in v and k in model]
        rows.append(_pair("model", r, [model[k] for k in keys], [decided[k][r] for k in keys]))
    for r1, r2 in combinations(reviewers, 2):
        keys = [k for k, v in decided.items() if r1 in v and r2 in v]
        rows.append(_pair(r1, r2, [decided[k][r1] for k in keys], [decided[k][r2] for k in keys]))
    return pd.DataFrame(rows, columns=["rater_a", "rater_b", "n", "agreement", "kappa"])


def reviewed_manifest(cases: Sequence[ReviewCase], store: ReviewStore) -> pd.DataFrame:
    """The cases with at least one reviewed finding as a manifest: ``path`` (the file, absolute), one 1 / 0 / empty
    column per label (the reviewers' common value; empty where they disagree or nobody decided), ``group`` (the
    content identity: one group per file, as nothing here says which files share a patient) and ``meta_*``."""
    decided = {}
    for domain in {c.domain for c in cases}:
        decided |= {(domain, *k): v for k, v in store.decisions(domain).items()}
    labels = sorted({f.label for c in cases for f in c.findings})
    rows = []
    for c in cases:
        mine = {f.label: decided.get((c.domain, c.case_id, f.label), {}) for f in c.findings}
        if not any(mine.values()):
            continue
        row: dict[str, object] = {"path": c.source, **{lb: math.nan for lb in labels}}
        for label, votes in mine.items():
            values = set(votes.values())
            if len(values) != 1:
                continue  # undecided or disagreed: unknown, masked in the loss
            (value,) = values
            if value in (PRESENT, ABSENT):
                row[label] = 1.0 if value == PRESENT else 0.0
            elif value in row:  # a multiclass case relabelled: the given label is the one present
                row[label], row[value] = 0.0, 1.0
        row |= {"group": c.case_id, "meta_domain": c.domain, "meta_model": c.model.get("model_name"),
                "meta_model_version": c.model.get("model_version"),
                "meta_reviewers": ",".join(sorted({r for v in mine.values() for r in v}))}  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows, columns=["path", *labels, "group", "meta_domain", "meta_model", "meta_model_version",
                                       "meta_reviewers"])  # fmt: skip


def export_manifest(cases: Sequence[ReviewCase], store: ReviewStore, out: str | Path) -> Path:
    """`reviewed_manifest` written as CSV or Parquet (by ``out``'s suffix), ready for ``data.manifest=...``."""
    from loupe.core.data.manifest import write_manifest

    frame = reviewed_manifest(cases, store)
    write_manifest(frame, Path(out))
    return Path(out)
