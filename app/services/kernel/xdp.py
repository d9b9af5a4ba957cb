"""Load, reload, describe and detach-check the XDP and TC egress programs of one interface.

Load once, read many: the first run on an interface compiles bpf/port_flow.c and bpf/egress.c (one BCC
text) in a separate loader process (app/services/kernel/xdp_loader.py; BCC never enters this one),
attaches both and pins programs and maps under ``<pin_root>/<interface>/``; later runs only check,
without a compiler, that the attached program is the pinned one built from the current source
(:func:`ensure_loaded`), then read the maps through libbpf (maps.py). Imported by the collector,
teardown, replay and ops; imports only app.errors, app.resources and kernel modules.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from app import resources
from app.errors import BpfError, DependencyError, NeedsRootError, UsageError
from app.services import progress
from app.services.kernel import egress, maps, pin_owner
from app.services.kernel.bpf_structs import META_CLSACT_ADDED, MAP_LAYOUT, PwMeta
# the loader's fail-closed steps (re-exported: the collector and tests use them as xdp.*)
from app.services.kernel.xdp_steps import (RETIRED, prefill_blacklist, restore_pins, retire_pins,  # noqa: F401
                                    retired_still_attached)
from app.services.kernel.attachment import xdp_attachment as attached_program

log = logging.getLogger(__name__)

BPF_DIR = resources.BPF_DIR
# compiled as ONE BCC text (BCC takes programs only from its main source, not from #include'd files)
SOURCES = (BPF_DIR / "port_flow.c", BPF_DIR / "egress.c")
SOURCE = SOURCES[0]
HEADERS = (BPF_DIR / "parse.h", BPF_DIR / "common.h")


@dataclass
class LoadState:
    interface: str
    pin_dir: Path
    mode: str
    program_id: int
    source_hash: str
    compiled: bool = False           # this run compiled (in the loader process)
    reloaded: bool = False           # this run replaced an attached program
    reason: str = ""                 # why it (re)loaded: first-load, source-changed, not-attached, maps-recreated
    compile_seconds: float = 0.0
    maps_created: bool = False       # this run's load created the maps (they count from zero)
    retired: Path | None = None      # the replaced maps, to close a last round from (then removed)
    prefilled: list = field(default_factory=list)   # CIDRs the loader wrote into the map before the attach


def build_flags(settings) -> list[str]:
    """-D flags for the build (map sizes, the reply idle time). PIN_DIR is added by the loader."""
    c = settings.collector
    for flag in c.extra_cflags.split():
        if not flag.startswith("-D"):
            raise UsageError(f"collector.extra_cflags may only hold -D flags, not {flag!r}")
    return [f"-DPORT_MAP_SIZE={c.port_map_size}", f"-DSOURCE_MAP_SIZE={c.source_map_size}",
            f"-DSRCPORT_MAP_SIZE={c.srcport_map_size}", f"-DFLOW_MAP_SIZE={c.flow_map_size}",
            f"-DBLACKLIST_MAP_SIZE={c.blacklist_map_size}", f"-DCONN_MAP_SIZE={c.conn_map_size}",
            f"-DSYNACK_MAP_SIZE={c.synack_map_size}", f"-DSCANNER_MAP_SIZE={c.scanner_map_size}",
            f"-DREPLY_IDLE_SECONDS={int(c.reply_idle_seconds)}", *c.extra_cflags.split()]


def map_sizes(settings) -> dict[str, int]:
    c = settings.collector
    return {"port_stats": c.port_map_size, "sources": c.source_map_size, "srcports": c.srcport_map_size,
            "flows": c.flow_map_size, "blacklist": c.blacklist_map_size, "eg_ports": c.port_map_size,
            "eg_dests": c.source_map_size, "eg_dstports": c.srcport_map_size, "eg_flows": c.flow_map_size,
            "eg_block": c.blacklist_map_size, "conns": c.conn_map_size, "synacks": c.synack_map_size,
            "scanners": c.scanner_map_size}


def source_hash(settings) -> str:
    """sha256 over the program source, the shared header and the build flags."""
    h = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        h.update(path.read_bytes())
    h.update(" ".join(build_flags(settings)).encode())
    return h.hexdigest()


def layout_mismatch(pin_dir: str | Path, sizes: dict[str, int]) -> str | None:
    """Why the pinned maps cannot be reused by a program built now (or None when they can).

    sizes: map name -> max_entries the new build asks for.
    """
    for name, (mtype, key_t, val_t) in MAP_LAYOUT.items():
        path = Path(pin_dir) / name
        if not path.exists():
            return f"map {name} is not pinned"
        with maps.PinnedMap(path) as m:
            if m.info.type != mtype:
                return f"map {name} has type {m.info.type}, expected {mtype}"
            if m.info.key_size != ctypes.sizeof(key_t) or m.info.value_size != ctypes.sizeof(val_t):
                return f"map {name} has key/value sizes {m.info.key_size}/{m.info.value_size}, expected {ctypes.sizeof(key_t)}/{ctypes.sizeof(val_t)}"
            want = sizes.get(name)
            if want is not None and m.info.max_entries != want:
                return f"map {name} has {m.info.max_entries} entries, the configuration asks for {want}"
    return None


def read_meta(pdir: Path) -> PwMeta | None:
    """The struct pw_meta the loader wrote into the pinned ``meta`` map (None without one)."""
    path = Path(pdir) / "meta"
    if not path.exists():
        return None
    with maps.PinnedMap(path) as m:
        return maps.read_struct(m, maps.INDEX_0, PwMeta)


def pin_dir(settings, interface: str) -> Path:
    return Path(settings.general.pin_root) / interface


def pinned_state(interface: str, pdir: Path) -> LoadState:
    """The LoadState of the program pinned in ``pdir`` as it is (nothing loaded): mode and source hash from
    its meta map, the program id from its pin (None when absent)."""
    meta = read_meta(pdir)
    prog = pdir / "prog"
    return LoadState(interface, pdir, {1: "native", 2: "generic"}.get(meta.mode) if meta else None,
                     maps.prog_info(prog).id if prog.exists() else None,
                     bytes(meta.source_hash).hex() if meta else None)


def check_interface(interface: str) -> int:
    """The interface's ifindex; UsageError with one sentence when it does not exist."""
    if not interface or "/" in interface or len(interface) > 15:
        raise UsageError(f"{interface!r} is not a valid interface name")
    try:
        return int(Path(f"/sys/class/net/{interface}/ifindex").read_text())
    except OSError:
        raise UsageError(f"interface {interface} does not exist: pick one from `ip link`") from None


def ensure_bpffs(root: Path) -> None:
    base = Path("/sys/fs/bpf")
    if subprocess.run(["mountpoint", "-q", str(base)]).returncode != 0:
        res = subprocess.run(["mount", "-t", "bpf", "bpf", str(base)], capture_output=True, text=True)
        if res.returncode != 0:
            raise BpfError("cannot mount the BPF filesystem on /sys/fs/bpf: this kernel lacks bpffs support")
        log.info("mounted bpffs on /sys/fs/bpf")
    root.mkdir(parents=True, exist_ok=True)


def describe(interface: str, pin_root: str | Path = "/sys/fs/bpf/portwatch") -> dict:
    """What is true now: {'attached', 'mode', 'program_id', 'pinned', 'pinned_program_id', 'source_hash', 'ours',
    'driver', 'egress_attached', 'egress_program_id', 'egress_pinned_program_id', 'egress_ours', 'clsact_added',
    'programs' (one line naming both programs, for status), 'owner_db', 'load_state', 'problem' (the last three
    from the pin record: pin_owner.describe_attachment)}."""
    attached = attached_program(interface)
    pdir = Path(pin_root) / interface
    eg_id = egress.attached_egress(interface) if Path(f"/sys/class/net/{interface}").exists() else None
    info = {"interface": interface, "attached": attached is not None, "mode": attached[1] if attached else None,
            "program_id": attached[0] if attached else None, "pinned": (pdir / "prog").exists(),
            "pinned_program_id": None, "source_hash": None, "ours": False, "driver": egress.driver_of(interface),
            "egress_attached": eg_id is not None, "egress_program_id": eg_id, "egress_pinned_program_id": None,
            "egress_ours": False, "clsact_added": False}
    if info["pinned"]:
        try:
            info["pinned_program_id"] = maps.prog_info(pdir / "prog").id
            meta = read_meta(pdir)
            if meta is not None:
                info["source_hash"] = bytes(meta.source_hash).hex()
                info["clsact_added"] = bool(meta.flags & META_CLSACT_ADDED)
        except BpfError:
            pass
        info["ours"] = attached is not None and attached[0] == info["pinned_program_id"]
    if (pdir / egress.PROG_PIN).exists():
        try:
            info["egress_pinned_program_id"] = maps.prog_info(pdir / egress.PROG_PIN).id
        except BpfError:
            pass
        info["egress_ours"] = eg_id is not None and eg_id == info["egress_pinned_program_id"]
    info["programs"] = egress.programs_text(info)       # one line for status: XDP and TC egress
    try:
        att = pin_owner.describe_attachment(interface, pin_root)
        info.update(owner_db=att["owner_db"], load_state=att["load_state"], problem=att["problem"],
                    foreign=att["foreign"], attach=att["attach"])
    except BpfError as exc:
        log.debug("cannot read the pin record of %s: %s", interface, exc)
    return info


def _reattach_egress(interface: str, pdir: Path) -> None:
    """Re-attach the pinned egress program (its filter or qdisc was removed): no compile."""
    prog_id, added = egress.attach(interface, pdir)
    with maps.PinnedMap(pdir / "meta") as m:
        meta = maps.read_struct(m, maps.INDEX_0, PwMeta)
        meta.egress_program_id = prog_id
        meta.flags |= META_CLSACT_ADDED if added else 0
        m.update(maps.INDEX_0, bytes(meta))
    log.warning("the TC egress program of %s was not attached: re-attached the pinned one (id %d)", interface, prog_id)


def ensure_loaded(settings, interface: str, prefill: Callable[[], list[str]] | None = None) -> LoadState:
    """Make sure our current program is attached to ``interface`` with maps pinned; compile only if not.

    XDP goes in the mode ``collector.xdp_mode`` picks (``auto``: generic on virtual drivers such as veth,
    where native XDP is a copy path, native else), the egress program on a clsact qdisc (egress.py).
    A changed source is reloaded without losing counts: the maps are ``BPF_TABLE_PINNED``, so the new
    program reuses them. Only a changed map layout or size recreates them: the loader moves the old pins
    to ``<pin_dir>/retired/`` (the old program keeps running on them) and the caller closes a last round
    from them after the swap (``LoadState.retired`` names that directory).

    Fail closed: prefill() gives the CIDRs the blacklist map must hold before a (re)loaded program is
    attached (the attach swaps programs atomically), so no packet of a blocked source passes; the loader
    records each step in the pin record BEFORE taking it (pin_owner.py).
    """
    if os.geteuid() != 0:
        raise NeedsRootError("portwatch needs root to load and read XDP programs: run it with sudo")
    check_interface(interface)
    root = Path(settings.general.pin_root)
    ensure_bpffs(root)
    pdir = root / interface
    want_hash = source_hash(settings)
    info = describe(interface, root)
    if info["ours"] and info["source_hash"] == want_hash:
        if not info["egress_ours"] and info["egress_pinned_program_id"] is not None:
            _reattach_egress(interface, pdir)
        if info["egress_ours"] or info["egress_pinned_program_id"] is not None:
            return LoadState(interface, pdir, info["mode"], info["program_id"], want_hash)

    if not info["pinned"] and not (pdir / "port_stats").exists():
        reason = "first-load"
    elif not info["ours"]:
        reason = "not-attached"
    else:
        reason = "source-changed"
    recreate = False
    if (pdir / "port_stats").exists():
        mismatch = layout_mismatch(pdir, map_sizes(settings))
        if mismatch:
            log.warning("pinned maps of %s cannot be reused (%s): recreating them", interface, mismatch)
            recreate = True
            reason = "maps-recreated"
    result = run_loader(settings, interface, pdir, recreate=recreate, prefill=prefill() if prefill else [])
    state = LoadState(interface, pdir, result["mode"], result["program_id"], want_hash, compiled=True,
                      reloaded=info["attached"], reason=reason, compile_seconds=result["compile_seconds"],
                      maps_created=bool(result.get("maps_created")),
                      retired=pdir / RETIRED if result.get("retired") else None,
                      prefilled=result.get("prefilled", []))
    log.info("XDP program loaded on %s (%s mode, id %d, %s, compiled in %.1f s)", interface, state.mode,
             state.program_id, reason, state.compile_seconds)
    return state


def run_loader(settings, interface: str, pdir: Path, recreate: bool = False, prefill: list[str] = ()) -> dict:
    """Run the BCC loader in its own process; return its JSON result. ``prefill``: CIDRs (stdin, JSON)."""
    cmd = [sys.executable, "-m", "app.services.kernel.xdp_loader", "load", "--interface", interface, "--pin-dir", str(pdir),
           "--mode", settings.collector.xdp_mode, "--hash", source_hash(settings)]
    if recreate:
        cmd.append("--recreate")
    cmd += ["--flag=" + f for f in build_flags(settings)]
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(resources.IMPORT_ROOT))
    with progress.ticking(f"compiling and attaching the XDP program on {interface} (BCC, in its own process)"):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                              input=json.dumps({"prefill": list(prefill)}))
    if proc.stderr.strip():
        # compiler diagnostics: kept in the log, the user sees the one-sentence error below
        log.log(logging.ERROR if proc.returncode else logging.DEBUG, "XDP loader said:\n%s", proc.stderr.strip()[-4000:])
    if proc.returncode != 0:
        msg = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode == 7:
            raise DependencyError(msg)
        raise BpfError(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])
