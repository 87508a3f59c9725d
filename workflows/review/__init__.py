"""Reviewing model output: review cases from predictions tables, the append-only review store, agreement
statistics and the export of reviewed cases as a manifest for the next fine-tune."""

from loupe.workflows.review.cases import TableInfo, build_case, case_context, find_tables, read_rows, review_cases

__all__ = ["TableInfo", "build_case", "case_context", "find_tables", "read_rows", "review_cases"]
