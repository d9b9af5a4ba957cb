"""Operating portwatch: alerts, metrics, health checks, the live view and the report (reports/).
Imports any service below it; imported by jobs, threads and commands."""
