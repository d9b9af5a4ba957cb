"""One module per ``python -m app`` subcommand: ``register(subparsers)`` and ``run(args, settings)`` -> exit code.
Registered through app/commands/registry.py (which app/cli.py calls); a command imports the registry,
services, threads and db, never app.cli or another command."""
