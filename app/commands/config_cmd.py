"""`python -m app config show [--json]` and `config check`: the effective settings and where each
value came from (default, the TOML file, a PORTWATCH_* variable, the command line).

Secrets are masked: passwords and tokens entirely, the webhook URL down to its scheme and host
(chat webhooks carry their token in the path). Unknown keys and bad values are errors of the
config loader itself: ``portwatch: error: config key 'collector.rounds' must be int, got 'x'``
(exit code 2).
"""
from __future__ import annotations

import json
from urllib.parse import urlsplit

from app.commands.registry import add_command
from app.services.text import counted, json_dumps

DESCRIPTION = """Show the effective configuration: every key as section.key = value, with where the value
came from (default, file:<path>, env:<NAME>, command line). Every key can be set in the TOML file
([section] tables; general keys at the top level) or by PORTWATCH_<SECTION>_<KEY>.
Secrets (smtp_password, the webhook URL's path) are masked."""

SECRET_WORDS = ("password", "secret", "token", "bouncer_key")
MASK = "********"


def mask(section: str, key: str, value):
    """The value as shown: secrets masked, everything else unchanged."""
    if any(word in key for word in SECRET_WORDS) and not key.endswith("_file"):
        return MASK if value else value
    if key == "webhook_url" and value:
        parts = urlsplit(str(value))
        if parts.scheme and parts.netloc:
            host = parts.hostname or ""
            port = f":{parts.port}" if parts.port else ""
            rest = "/" + MASK if (parts.path.strip("/") or parts.query) else ""
            return f"{parts.scheme}://{host}{port}{rest}"
        return MASK
    return value


def effective(settings) -> list[dict]:
    return [{"key": f"{section}.{key}", "value": mask(section, key, value), "source": source}
            for section, key, value, source in settings.items()]


def _text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def register(sub) -> None:
    parser = add_command(sub, "config", "show or check the effective configuration", DESCRIPTION)
    actions = parser.add_subparsers(dest="config_action", metavar="ACTION")
    show = add_command(actions, "show", "print every setting, its value and where it came from",
                       "Print every setting (section.key = value) and its source (default, file, env, "
                       "command line); secrets masked.")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=run_show)
    check = add_command(actions, "check", "load the configuration and report problems (exit 2 if any)",
                        "Load the config file and PORTWATCH_* variables; report every problem at once with its "
                        "key and file (exit 2), or exit 0 when valid.")
    check.add_argument("--json", action="store_true",
                       help='print one JSON object: {"valid": true|false, "config_file", "problems": [...]}')
    check.set_defaults(func=run_check)
    parser.set_defaults(func=run_missing, config_parser=parser)


def run_missing(args, settings) -> int:
    from app.errors import UsageError
    raise UsageError("config needs an action: config show [--json] or config check")


def run_show(args, settings) -> int:
    rows = effective(settings)
    if getattr(args, "json", False):
        print(json_dumps({"config_file": settings.config_path,
                          "settings": {r["key"]: {"value": r["value"], "source": r["source"]} for r in rows}},
                         indent=2))
        return 0
    print(f"# config file: {settings.config_path or 'none (defaults and environment only)'}")
    width = max(len(r["key"]) for r in rows)
    for r in rows:
        print(f"{r['key']:<{width}} = {_text(r['value'])}    # {r['source']}")
    return 0


def run_check(args, settings) -> int:
    changed = sum(1 for r in effective(settings) if r["source"] != "default")
    if getattr(args, "json", False):      # an invalid configuration never gets here: app/cli.py prints that
        print(json_dumps({"valid": True, "config_file": settings.config_path, "problems": [],
                          "set_outside_defaults": changed}))
        return 0
    print(f"configuration is valid ({settings.config_path or 'no config file'}; {counted(changed, 'value')} set "
          "outside the defaults)")
    return 0
