"""Figures and the self-contained HTML report of a run; reads run folders, never trains."""

from spinegrade.report.html import build_report

__all__ = ["build_report"]
