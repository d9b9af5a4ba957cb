"""The work: collector, rounds, XDP, host facts, findings, rules, model, evaluation, blocklist, alerts,
metrics, reports. Imported by commands, threads and the demo; imports app.db, never threads, commands or the CLI."""
