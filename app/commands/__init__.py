"""One module per ``python -m app`` subcommand: ``register(subparsers)`` and ``run(args, settings)`` -> exit code.
Imported only by app/cli.py; imports services, threads and db, never another command."""
