"""The matplotlib report (PNGs + index.html): facts (what to show, from the store), figures (the only
matplotlib importer), page (HTML, ``write_report``). Imported by the report command and the evaluator job."""
from app.services.ops.reports.facts import parse_since
from app.services.ops.reports.page import write_report

__all__ = ["parse_since", "write_report"]
