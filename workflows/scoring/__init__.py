"""Batch scoring: a folder or manifest → a Parquet predictions table (and a unit table), resumable, locally or on
Ray Data."""

from loupe.workflows.scoring.api import ScoreOptions, ScoreSummary, ScoringInterrupted, score
from loupe.workflows.scoring.backends import RayOptions
from loupe.workflows.scoring.model import Provenance, ResolvedModel, resolve_model
from loupe.workflows.scoring.table import VOLATILE_COLUMNS, table_schema, unit_schema, units_path

__all__ = [
    "VOLATILE_COLUMNS",
    "Provenance",
    "RayOptions",
    "ResolvedModel",
    "ScoreOptions",
    "ScoreSummary",
    "ScoringInterrupted",
    "resolve_model",
    "score",
    "table_schema",
    "unit_schema",
    "units_path",
]
