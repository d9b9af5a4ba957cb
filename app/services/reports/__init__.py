"""The matplotlib report (PNG figures + index.html): facts (what to show, read from the store),
figures (the only matplotlib importer), page (the HTML and ``write_report``). Imported by commands and services.
"""
from app.services.reports.facts import parse_since
from app.services.reports.page import write_report

__all__ = ["parse_since", "write_report"]
