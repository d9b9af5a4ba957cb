"""`down`: close a final round, detach portwatch's XDP program from an interface and remove its pins."""
from __future__ import annotations

from app.commands.registry import add_command


def register(sub) -> None:
    p = add_command(sub, "down", "detach XDP and remove the pins for an interface",
                    "Close a final round into the database that enforces the interface (whichever it is), "
                    "detach portwatch's XDP program (a leftover one too) and remove the pins.")
    p.add_argument("--interface", "-i", required=True, help="interface to detach from")
    p.set_defaults(func=run)


def run(args, settings) -> int:
    from app.services.collector import teardown
    done = teardown.down(settings, args.interface)
    print("; ".join(done) if done else f"nothing of portwatch's was attached to or pinned for {args.interface}")
    return 0
