"""The pin directory's own record: which database enforces an interface, and what the loader attached.

bpffs holds only BPF objects, so the record is a pinned one-entry BPF array map,
``<pin_root>/<interface>/owner``, whose value is UTF-8 JSON (:func:`write` shows it). It lives and dies
with the pins: `down`, a reboot or an ``rm -r`` of the pin directory takes it along. Who writes which key,
and why: :func:`claim`. Imported by the collector, the loader process, teardown and ops (status, doctor);
imports only kernel modules.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import secrets
import time
from pathlib import Path

from app.errors import BpfError, UsageError
from app.services.kernel import libxdp, maps

log = logging.getLogger(__name__)

OWNER = "owner"
RECORD_BYTES = 4096
PROGRAM_NAME = b"xdp_port_flow"           # what BCC names portwatch's program (bpf/port_flow.c's function)
_BPF_MAP_TYPE_ARRAY = 2


def _lib():
    lib = maps.libbpf()
    lib.bpf_map_create.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                                   ctypes.c_void_p]
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    return lib


def read(pdir: str | Path) -> dict | None:
    """The record of pin directory ``pdir`` (None when it has none or it cannot be read)."""
    path = Path(pdir) / OWNER
    if not path.exists():
        return None
    try:
        with maps.PinnedMap(path) as m:
            raw = m.lookup(maps.INDEX_0)
    except BpfError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    text = (raw or b"").split(b"\0", 1)[0]
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def write(pdir: str | Path, record: dict) -> None:
    """Store ``record`` (the pinned map is created when absent) as UTF-8 JSON, NUL-padded to RECORD_BYTES::

        {"db_id": "<hex>", "db_path": "/var/lib/portwatch/ports.db", "claimed_at": 1764120000.0,
         "epoch": "<hex>",                 # random, new at every claim by another database (a takeover is an epoch)
         "null_epoch": "<hex>",            # (only after an upgrade) snapshots stored before epochs belong to this one
         "maps_born": [812, 813, ...],     # kernel ids of maps that started at zero while this db owned them
         "load": {"state": "compiling"|"attaching"|"attached", "pid": 4242, "at": ..., "program_id": 977,
                  "program_tag": "a1b2...", "retired": false}}
    """
    path = Path(pdir) / OWNER
    data = json.dumps(record, sort_keys=True).encode()
    if len(data) >= RECORD_BYTES:
        raise BpfError(f"the pin record of {pdir} would exceed {RECORD_BYTES} bytes")
    Path(pdir).mkdir(parents=True, exist_ok=True)
    if not path.exists():
        lib = _lib()
        fd = lib.bpf_map_create(_BPF_MAP_TYPE_ARRAY, b"pw_owner", 4, RECORD_BYTES, 1, None)
        if fd < 0:
            raise BpfError(f"cannot create the pin record map ({os.strerror(maps._err(fd))})")
        try:
            if lib.bpf_obj_pin(fd, str(path).encode()) != 0 and not path.exists():
                raise BpfError(f"cannot pin the pin record at {path}")
        finally:
            os.close(fd)
    with maps.PinnedMap(path) as m:
        m.update(maps.INDEX_0, data.ljust(RECORD_BYTES, b"\0"))


def update(pdir: str | Path, **fields) -> dict:
    """Merge ``fields`` into the record (read, change, write); returns the new record."""
    record = read(pdir) or {}
    record.update(fields)
    write(pdir, record)
    return record


def record_load(pdir: str | Path, state: str, **details) -> None:
    """The loader's step, written BEFORE it is taken (state: compiling, attaching, attached)."""
    record = read(pdir) or {}
    load = dict(record.get("load") or {}) if state != "compiling" else {}
    load.update(details, state=state, pid=os.getpid(), at=time.time())
    record["load"] = load
    write(pdir, record)


def new_epoch() -> str:
    """A random takeover epoch."""
    return secrets.token_hex(8)


def claimed_by_other(pdir: str | Path, db_id: str) -> bool:
    """True when ``pdir``'s record names a database other than ``db_id``."""
    record = read(pdir) if Path(pdir).exists() else None
    return bool(record and record.get("db_id") and record["db_id"] != db_id)


def claim(pdir: str | Path, interface: str, db_id: str, db_path: str | Path, takeover: bool = False,
          epoch: str | None = None) -> dict:
    """Make ``pdir`` enforced by the database ``db_id`` (at ``db_path``), or refuse.

    A directory with no record (or one no database claimed) is claimed; one claimed by this database
    is kept (its path brought up to date); one claimed by another database raises UsageError unless
    ``takeover`` — then the record names this database and no map counts as born for it. Every claim by a
    database the record did not name starts a new epoch (``epoch``, or a random one).

    Who writes what:
    The collector claims the directory (:func:`claim`) before anything is loaded or read: a record
    naming another database refuses the run with one sentence (`down` first, or ``--takeover``). The
    loader process (app/services/kernel/xdp_loader.py) writes ``load`` at each step BEFORE taking it — "compiling"
    when it starts, "attaching" with the program's id and tag before the attach — so a loader killed
    anywhere leaves a record; :func:`describe_attachment` (status, doctor) reports it, and `down`
    removes what it names. ``maps_born`` tells the collector that these maps started from zero for
    this database, so their first round counts everything (otherwise that round is only a baseline).
    ``epoch`` changes whenever another database claims the directory: a database's snapshot records the
    epoch it was read under, and a round against a snapshot of another epoch is only a baseline — so a
    database taking an interface back never counts what the other one counted meanwhile.
    """
    record = read(pdir)
    db_path = str(Path(db_path).resolve())
    if record and record.get("db_id") and record["db_id"] != db_id:
        if not takeover:
            raise refusal(interface, record)
        log.warning("taking %s over from the database %s: its blocklist becomes this database's", interface,
                    record.get("db_path"))
        record = {k: v for k, v in record.items() if k not in ("epoch", "null_epoch")}
        record["maps_born"] = []
    if record is None and (Path(pdir) / "port_stats").exists():
        # pins made before pin records existed (an older portwatch): adopted, their counts are this
        # database's as before (a snapshot it stored keeps being used; without one, they count whole)
        record = {"maps_born": sorted(_pinned_map_ids(Path(pdir)).values()), "null_epoch": True}
        log.info("adopting the record-less pins of %s for %s", interface, db_path)
    record = dict(record or {})
    if not record.get("epoch"):
        record["epoch"] = epoch or new_epoch()
        if record.get("db_id") == db_id or record.get("null_epoch") is True:
            record["null_epoch"] = record["epoch"]     # an upgrade: this database's older snapshots stay valid
        else:
            record.pop("null_epoch", None)
    elif record.get("db_id") == db_id and record.get("db_path") == db_path:
        return record
    record.update(db_id=db_id, db_path=db_path, claimed_at=time.time())
    record.setdefault("maps_born", [])
    write(pdir, record)
    return record


def epoch_accepts(record: dict | None, snapshot_epoch: str | None) -> bool:
    """Was a snapshot read under ``snapshot_epoch`` taken in the record's current epoch? (No record: only
    snapshots without an epoch are.)"""
    epoch = (record or {}).get("epoch")
    if snapshot_epoch is None:
        return epoch is None or (record or {}).get("null_epoch") == epoch
    return snapshot_epoch == epoch


def _pinned_map_ids(pdir: Path) -> dict[str, int]:
    from app.services.kernel.bpf_structs import MAP_LAYOUT
    ids = {}
    for name in MAP_LAYOUT:
        if (pdir / name).exists():
            try:
                with maps.PinnedMap(pdir / name) as m:
                    ids[name] = m.info.id
            except BpfError:
                pass
    return ids


def born_ids(pdir: str | Path) -> set[int]:
    """Kernel ids of the maps that started at zero while the recorded database owned ``pdir``."""
    born = (read(pdir) or {}).get("maps_born") or []
    return set(born) if isinstance(born, list) else set()


def note_born(pdir: str | Path, ids) -> None:
    """Add maps a load just created to ``maps_born``, keeping only ids still pinned here or in ``retired/``."""
    pdir = Path(pdir)
    pinned = set(_pinned_map_ids(pdir).values()) | set(_pinned_map_ids(pdir / "retired").values())
    update(pdir, maps_born=sorted((born_ids(pdir) | set(ids)) & pinned))


def refusal(interface: str, record: dict) -> UsageError:
    """The one sentence a run with another database gets."""
    return UsageError(f"interface {interface} is enforced by another database ({record.get('db_path')}): run "
                      f"`python -m app down --interface {interface}` first, or pass --takeover to move it to this "
                      "database on purpose")


def refuse_other_database(pdir: str | Path, interface: str, db_path: str | Path, takeover: bool = False) -> None:
    """Raise :func:`refusal` when another database enforces ``pdir`` — checked before ``db_path`` is opened
    for writing (a database that does not exist yet is not created)."""
    record = read(pdir) if Path(pdir).exists() else None
    if takeover or not record or not record.get("db_id"):
        return
    mine = None
    if Path(db_path).exists():
        from app.db.connection import connect
        from app.db.rounds import read_database_id
        conn = connect(db_path, readonly=True)
        try:
            mine = read_database_id(conn)
        finally:
            conn.close()
    if mine != record["db_id"]:
        raise refusal(interface, record)


def owned_by(pdir: str | Path, db_id: str | None) -> bool:
    """True when ``pdir`` is this database's to touch (claimed by it, or by no database)."""
    record = read(pdir)
    return not record or not record.get("db_id") or record["db_id"] == db_id


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def program_name(program_id: int) -> str | None:
    """The kernel's name of program ``program_id`` (None when it cannot be read)."""
    lib = _lib()
    fd = lib.bpf_prog_get_fd_by_id(program_id)
    if fd < 0:
        return None
    try:
        info = maps.BpfProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) < 0:
            return None
        return info.name.decode(errors="replace")
    finally:
        os.close(fd)


def describe_attachment(interface: str, pin_root: str | Path) -> dict:
    """What is attached to ``interface`` and what portwatch recorded about it (status, doctor, down).

    {'program_id', 'program_name', 'owner_db', 'load_state', 'recorded', 'leftover', 'foreign', 'problem',
    'attach'}: ``attach``: how the loader attached portwatch's program (app/services/kernel/libxdp.py attach_text);
    ``recorded``: the attached program is the one the record or the pin names; ``leftover``: an
    attached portwatch program (by its name) that nothing records; ``foreign``: one sentence naming an
    attached program portwatch did not load, or None; ``problem``: one sentence, or None.
    """
    from app.services.kernel.attachment import xdp_attachment
    pdir = Path(pin_root) / interface
    attached = xdp_attachment(interface) if Path(f"/sys/class/net/{interface}").exists() else None
    record = read(pdir) if pdir.exists() else None
    load = (record or {}).get("load") or {}
    pinned_id = None
    if (pdir / "prog").exists():
        try:
            pinned_id = maps.prog_info(pdir / "prog").id
        except BpfError:
            pass
    info = {"interface": interface, "program_id": attached[0] if attached else None,
            "program_name": program_name(attached[0]) if attached and attached[0] else None,
            "owner_db": (record or {}).get("db_path"), "load_state": load.get("state"), "recorded": False,
            "leftover": False, "foreign": None, "problem": None, "attach": load.get("attach")}
    if attached:
        info["recorded"] = attached[0] in (pinned_id, load.get("program_id"))
        info["leftover"] = not info["recorded"] and info["program_name"] == PROGRAM_NAME.decode()
        if not (info["recorded"] or info["leftover"]):
            info["foreign"] = foreign_text(interface, attached[0], info["program_name"])
    fix = f"`python -m app down --interface {interface}` removes it"
    if info["leftover"]:
        info["problem"] = (f"a portwatch XDP program (id {attached[0]}) is attached to {interface} with no record "
                           f"of its load: {fix}")
    elif load and load.get("state") != "attached" and not _alive(load.get("pid")):
        info["problem"] = (f"a load of the XDP program on {interface} did not finish (pid {load.get('pid')} stopped "
                           f"while {load.get('state')}): {fix}")
    return info


def foreign_text(interface: str, program_id: int, name: str | None) -> str:
    """The one sentence naming a program portwatch did not load."""
    try:
        neighbour = libxdp.neighbour_text(interface, program_id, name)     # a libxdp program: can it share?
    except Exception as exc:          # naming the program matters more than the detail
        log.debug("cannot tell whether program %s is a libxdp one: %s", program_id, exc)
        neighbour = ""
    return (f"XDP program {program_id} ({name or 'unnamed'}) on {interface} was not loaded by portwatch: portwatch "
            "never replaces it (collect --replace takes the interface over on purpose, stopping what it does)"
            + neighbour)


def refuse_foreign(interface: str, pin_root: str | Path, replace: bool = False) -> None:
    """BpfError (exit 5) naming the program attached to ``interface`` when portwatch did not load it, unless
    ``replace``: a load balancer or a DDoS filter there keeps working."""
    info = describe_attachment(interface, pin_root)
    if not info["foreign"]:
        return
    if not replace:
        raise BpfError(info["foreign"])
    log.warning("replacing XDP program %s (%s) on %s on purpose (--replace)", info["program_id"],
                info["program_name"], interface)


def foreign_programs(pin_root: str | Path) -> list[tuple[str, str]]:
    """(interface, sentence) for every XDP program on this host that portwatch did not load."""
    return _sentences(pin_root, "foreign")


def problems(pin_root: str | Path) -> list[tuple[str, str]]:
    """(interface, sentence) for every unfinished load and every leftover portwatch program on this host."""
    return _sentences(pin_root, "problem")


def _sentences(pin_root: str | Path, field: str) -> list[tuple[str, str]]:
    """(interface, describe_attachment()[field]) for every interface and pin directory where it is set."""
    names = set()
    for base in (Path(pin_root), Path("/sys/class/net")):
        try:
            names.update(p.name for p in base.iterdir() if p.is_dir() or base.name == "net")
        except OSError:
            pass
    found = []
    for name in sorted(names):
        try:
            sentence = describe_attachment(name, pin_root)[field]
        except Exception as exc:   # a vanished interface, no libbpf: not this check's business
            log.debug("cannot describe %s: %s", name, exc)
            continue
        if sentence:
            found.append((name, sentence))
    return found
