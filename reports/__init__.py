"""The HTML report layer (installed as the ``normscope_reports`` package).

``build_report(run, findings=..., out=...)`` writes one self-contained, offline HTML file.
"""

from normscope_reports.html import build_report

__all__ = ["build_report"]
