"""Judging stored rounds: series and windows, the model and its versions, the rule detectors, findings
and who they name, their explanation, and their score against labelled attacks (score). Imports leaves and app.db; never the collector or the kernel."""
