"""Is portwatch healthy? The one set of checks behind ``status`` (exit code), ``doctor`` and the metrics.

    check(settings, interfaces=None, now=None, xdp_facts=None) -> Health
    Health.checks: [Check(name, ok, detail)]    ok: True, False, or None when it could not be checked
    Health.healthy / Health.reason               False / the first failed check's detail in one line

The checks and their stable names: :func:`check`. Reads only: the database is opened read-only, maps
through PinnedMap lookups.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.errors import BpfError
from app.services.text import counted, duration, utc

log = logging.getLogger(__name__)

STALE_FACTOR = 3            # no round for this many round lengths: unhealthy
CHECK_NAMES = ("database", "rounds", "xdp", "evaluation", "model", "blocklist")


@dataclass
class Check:
    name: str
    ok: bool | None          # None: could not be checked (e.g. not root); never makes status fail
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Health:
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    @property
    def healthy(self) -> bool:
        return not self.failed

    @property
    def reason(self) -> str:
        """One line: the first failure, and how many more there are."""
        failed = self.failed
        if not failed:
            return "healthy"
        more = f" (and {len(failed) - 1} more problem{'s' if len(failed) > 2 else ''}: see status --json)" \
            if len(failed) > 1 else ""
        return f"{failed[0].name}: {failed[0].detail}{more}"

    def as_dict(self) -> dict:
        return {"healthy": self.healthy, "reason": self.reason, "checks": [c.as_dict() for c in self.checks]}


def round_length(settings, recent_lengths: list[float]) -> float:
    """Seconds one round is expected to take: the configured length or the recent median, the longer."""
    median = statistics.median(recent_lengths) if recent_lengths else 0.0
    return max(float(settings.collector.round_seconds), float(median))


def check_database(settings, size_bytes: int, exists: bool) -> Check:
    db = settings.general.db
    if not exists:
        return Check("database", False, f"no database at {db} yet: run python -m app collect (or install-cron)")
    limit_mb = float(settings.general.max_db_mb)
    size_mb = size_bytes / 2 ** 20
    if limit_mb > 0 and size_mb > limit_mb:
        return Check("database", False, f"{db} is {size_mb:.1f} MiB, above general.max_db_mb = {limit_mb:g}: "
                                        "lower retention.keep_days and run python -m app cleanup")
    limit = f" of {limit_mb:g} MiB allowed" if limit_mb > 0 else ""
    return Check("database", True, f"{size_mb:.1f} MiB{limit}")


def check_rounds(settings, facts: dict | None, now: float) -> Check:
    if not facts or not facts["last"]:
        return Check("rounds", False, "no round recorded yet: run python -m app collect (or install-cron)")
    last = facts["last"]
    length = round_length(settings, facts["lengths"])
    age = now - last["end_time"]
    if age > STALE_FACTOR * length:
        return Check("rounds", False, f"no round for {duration(age)} (last #{last['id']} on {last['interface']}; "
                                      f"one expected every {duration(length)}): is the collector's cron job running?")
    return Check("rounds", True, f"last round #{last['id']} on {last['interface']} ended {duration(max(age, 0))} ago")


def check_xdp(described: list[dict]) -> Check:
    """``described``: app.services.kernel.xdp.describe() results (plus 'exists') of the interfaces to check."""
    problems, good = [], []
    for x in described:
        if not x.get("pinned"):
            continue
        name = x["interface"]
        if not x.get("exists", True):
            problems.append(f"{name} is gone but its pins remain (python -m app down --interface {name})")
        elif not x.get("attached"):
            problems.append(f"pins for {name} but no XDP program attached (the next collect re-attaches it)")
        elif x.get("ours") is False:
            problems.append(f"the XDP program on {name} (id {x.get('program_id')}) is not portwatch's pinned one")
        else:
            good.append(f"{name} ({x.get('mode')})")
    if problems:
        return Check("xdp", False, "; ".join(problems))
    if not good:
        return Check("xdp", True, "no pinned program (nothing to check)")
    return Check("xdp", True, "attached on " + ", ".join(good))


def check_evaluation(last_real: dict | None, last_noop: dict | None) -> Check:
    if not last_real:
        return Check("evaluation", True, "no evaluation yet")
    status = last_real["status"] or "running"
    at = last_real["finished_at"] or last_real["started_at"]
    when = utc(at, seconds=False)
    if status.startswith("error"):
        return Check("evaluation", False, f"the last evaluation (#{last_real['id']}, {when}) failed: "
                                          f"{status.removeprefix('error: ')}")
    noop = ""
    if last_noop and last_noop["id"] > last_real["id"]:
        noop = " (later runs found no new rounds)"
    return Check("evaluation", True, f"#{last_real['id']} {when}: {status}{noop}")


def check_model(settings, rounds: int, model: dict | None) -> Check:
    warmup = int(settings.evaluator.warmup_rounds)
    in_warmup = rounds < warmup
    if model is None:
        if in_warmup:
            return Check("model", True, f"warm-up: {rounds} of {warmup} rounds, the model alerts after that")
        return Check("model", False, f"no active model after {rounds} rounds (warm-up is {warmup}): "
                                     "run python -m app evaluate, or see python -m app model list")
    from app.services.evaluation.model import not_loadable      # reads config.json only: no TensorFlow
    why = not_loadable(model["path"]) if model.get("path") else "it has no files"
    if why:
        return Check("model", False, f"the active model version {model['version']} is not loadable ({why}): "
                                     "the next evaluation fits a new one; see python -m app model list")
    threshold = model["threshold"]
    if threshold is None or not math.isfinite(threshold):
        if in_warmup:
            return Check("model", True, f"warm-up: {rounds} of {warmup} rounds (model {model['version']} "
                                        "has no threshold yet)")
        return Check("model", False, f"model version {model['version']} has no finite threshold, so it can never "
                                     "alert: retrain (python -m app model) or roll back to a version that has one")
    return Check("model", True, f"version {model['version']}, threshold {threshold:.4g}")


def read_blacklist_map(path: Path) -> set[str]:
    """CIDR text of every entry of a pinned blacklist map (keys only)."""
    from app.services.kernel import maps
    from app.services.kernel.bpf_structs import lpm_key_text
    with maps.PinnedMap(path) as m:
        keys, _, n = m.items()
        ks = m.info.key_size
    return {lpm_key_text(keys[i * ks:(i + 1) * ks]) for i in range(n)}


def check_blocklist(settings, interfaces: list[str], ledger: list[str]) -> Check:
    root = Path(settings.general.pin_root)
    wanted = set(ledger)
    problems, checked, unreadable = [], [], []
    for name in interfaces:
        path = root / name / "blacklist"
        if not path.exists():
            continue
        try:
            in_map = read_blacklist_map(path)
        except (BpfError, OSError) as exc:
            unreadable.append(f"{name}: {exc}")
            continue
        missing, extra = sorted(wanted - in_map), sorted(in_map - wanted)
        if missing or extra:
            parts = ([f"{counted(len(missing), 'ledger entry', 'ledger entries')} missing from the map "
                      f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"] if missing else []) + \
                    ([f"{counted(len(extra), 'map entry', 'map entries')} the ledger does not hold "
                      f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"] if extra else [])
            problems.append(f"{name}: " + " and ".join(parts))
        else:
            checked.append(name)
    if problems:
        return Check("blocklist", False, "; ".join(problems) + " (the next collect round reconciles them)")
    if unreadable and not checked:
        return Check("blocklist", None, "cannot read the pinned maps: " + "; ".join(unreadable))
    if not checked:
        return Check("blocklist", True, f"{counted(len(wanted), 'active entry', 'active entries')}, no pinned map")
    return Check("blocklist", True, f"{counted(len(wanted), 'active entry', 'active entries')}, "
                                    f"in step with the map of {', '.join(checked)}")


def describe_interface(interface: str, pin_root: str) -> dict:
    """{'interface', 'exists', 'attached', 'mode', 'program_id', 'pinned', 'ours', 'pin_dir', ...}.

    app.services.kernel.xdp.describe (netlink + the pinned program's id); without the rights to open the
    pins (not root) the attachment still comes from netlink and 'ours' is None (unknown)."""
    from app.services.kernel import xdp
    pdir = Path(pin_root) / interface
    exists = Path(f"/sys/class/net/{interface}").exists()
    info = {"interface": interface, "exists": exists, "attached": False, "mode": None, "program_id": None,
            "pinned": (pdir / "prog").exists(), "ours": None, "pin_dir": str(pdir)}
    if not exists:
        return info
    try:
        info.update(xdp.describe(interface, pin_root))
    except Exception as exc:     # no libbpf, no permission to read the pins, ...
        log.debug("xdp.describe(%s) failed (%s); netlink only", interface, exc)
        attached = xdp.attached_program(interface)
        if attached:
            info.update(attached=True, program_id=attached[0], mode=attached[1])
    return info


def gather_facts(settings, now: float | None = None) -> dict:
    """What the database says, read once: {'exists', 'bytes', 'rounds' (round_facts), 'last_real',
    'last_noop', 'model', 'ledger'}."""
    from app.db import health as queries
    from app.db.connection import connect
    from app.services.files import database_bytes
    db = Path(settings.general.db)
    facts = {"exists": db.exists(), "bytes": database_bytes(db), "rounds": None, "last_real": None,
             "last_noop": None, "model": None, "ledger": []}
    if not facts["exists"]:
        return facts
    conn = connect(db, readonly=True)
    try:
        facts["rounds"] = queries.round_facts(conn)
        facts["last_real"] = queries.last_real_evaluation(conn)
        facts["last_noop"] = queries.last_noop_evaluation(conn)
        facts["model"] = queries.active_model(conn)
        facts["ledger"] = queries.active_blocks(conn)
    finally:
        conn.close()
    return facts


def interfaces_to_check(settings, facts: dict, interfaces: list[str] | None = None) -> list[str]:
    """--interface names, else every interface of this database's rounds plus general.interface."""
    if interfaces:
        return list(interfaces)
    names = list(facts["rounds"]["interfaces"]) if facts.get("rounds") else []
    if settings.general.interface and settings.general.interface not in names:
        names.append(settings.general.interface)
    return names


def check(settings, interfaces: list[str] | None = None, now: float | None = None, *,
          facts: dict | None = None, described: list[dict] | None = None) -> Health:
    """Run every check. ``facts`` (gather_facts) and ``described`` (describe_interface per interface)
    may be passed by a caller that already has them (status shows them too).

    The checks (names are stable: scripts and the ``portwatch_health_check{check=...}`` metric use them):

      database     the database exists and is below general.max_db_mb (0: no limit)
      rounds       a round ended within 3 x the round length (the longer of collector.round_seconds and
                   the recent rounds' median length)
      xdp          wherever <pin_root>/<interface>/prog is pinned, portwatch's pinned program is attached
      evaluation   the last real evaluation (a no-op 'no-rounds' one never hides it) did not fail
      model        past warm-up (evaluator.warmup_rounds rounds) an active model with a finite threshold
                   exists, i.e. the model can alert; an active model whose files cannot be loaded (gone,
                   another format) is unhealthy at any time
      blocklist    every pinned blacklist map of an interface of this database holds exactly the
                   ledger's active entries
    """
    now = time.time() if now is None else now
    facts = gather_facts(settings) if facts is None else facts
    names = interfaces_to_check(settings, facts, interfaces)
    if described is None:
        described = [describe_interface(name, settings.general.pin_root) for name in names]
    rounds = facts["rounds"]["rounds"] if facts.get("rounds") else 0
    return Health([
        check_database(settings, facts["bytes"], facts["exists"]),
        check_rounds(settings, facts.get("rounds"), now),
        check_xdp(described),
        check_evaluation(facts.get("last_real"), facts.get("last_noop")),
        check_model(settings, rounds, facts.get("model")),
        check_blocklist(settings, names, facts.get("ledger", [])),
    ])


def metric_values(health: Health) -> dict[tuple[str, str], float]:
    """{(metric key, check name): value} for app.services.ops.metrics: 1 ok, 0 failed, NaN unknown."""
    return {("health_check", c.name): (1.0 if c.ok else (0.0 if c.ok is False else math.nan)) for c in health.checks}
