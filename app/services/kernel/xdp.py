"""Compile, attach, pin, reload and detach the XDP and TC egress programs — the only user of BCC.

Load once, read many: the first collector run on an interface compiles the XDP program bpf/port_flow.c
and the TC egress program bpf/egress.c (one BCC text, one compile) with BCC,
attaches both (XDP in the mode ``collector.xdp_mode`` picks — ``auto``: generic on virtual drivers
such as veth, where native XDP is a copy path, native else; the egress program on a clsact
qdisc through app/services/kernel/egress.py) and pins the programs and their maps under
``<pin_root>/<interface>/``. Later runs only check, without any
compiler, that the attached program is the pinned one and was built from the current source
(the ``meta`` map holds the source hash), then read the maps through libbpf (maps.py).

BCC (clang/LLVM, ~200 MB, ~4 CPU-s) runs in a SEPARATE process (``python -m app.services.kernel.xdp
load ...``): the collector process never imports it, and BCC's LLVM cannot clash with another
library's (importing TensorFlow and BCC into one process crashes on this platform).

A changed source is reloaded on the next run without losing counts: the maps are declared
``BPF_TABLE_PINNED``, so the new program reuses the pinned maps and their counters. Only when
the map layout or sizes changed must the maps be recreated: the loader moves the old pins to
``<pin_dir>/retired/`` (the old program keeps running on them), compiles (new maps), and the
caller closes a last round from the retired maps after the swap, so nothing is lost there either.

Fail closed: before the new program is attached (the attach swaps programs atomically) the
loader writes the ledger's active entries (``prefill``, from the caller) into the blacklist map
the new program consults (:func:`prefill_blacklist`), so no packet of a blocked source passes.
It records each step in the pin record BEFORE taking it (app/services/kernel/pin_owner.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from app import resources
from app.errors import BpfError, DependencyError, NeedsRootError, UsageError
from app.services import progress
from app.services.kernel import egress, libxdp, maps, pin_owner
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
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_NUMBERS = {"native": 1, "generic": 2}


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
    """-D flags for the build (map sizes). PIN_DIR is added by the loader."""
    c = settings.collector
    for flag in c.extra_cflags.split():
        if not flag.startswith("-D"):
            raise UsageError(f"collector.extra_cflags may only hold -D flags, not {flag!r}")
    return [f"-DPORT_MAP_SIZE={c.port_map_size}", f"-DSOURCE_MAP_SIZE={c.source_map_size}",
            f"-DSRCPORT_MAP_SIZE={c.srcport_map_size}", f"-DFLOW_MAP_SIZE={c.flow_map_size}",
            f"-DBLACKLIST_MAP_SIZE={c.blacklist_map_size}", *c.extra_cflags.split()]


def map_sizes(settings) -> dict[str, int]:
    c = settings.collector
    return {"port_stats": c.port_map_size, "sources": c.source_map_size, "srcports": c.srcport_map_size,
            "flows": c.flow_map_size, "blacklist": c.blacklist_map_size, "eg_ports": c.port_map_size,
            "eg_dests": c.source_map_size, "eg_dstports": c.srcport_map_size, "eg_flows": c.flow_map_size,
            "eg_block": c.blacklist_map_size}


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

    prefill(): the CIDRs the blacklist map must hold before a (re)loaded program is attached. When
    the maps were recreated, ``LoadState.retired`` names the old maps' directory (see module doc).
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
    cmd = [sys.executable, "-m", "app.services.kernel.xdp", "load", "--interface", interface, "--pin-dir", str(pdir),
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


# --- the loader process ---------------------------------------------------------------------

def bcc_modules():
    """(BPF, libbcc) of BCC — imported only here, in a loader process; DependencyError when absent."""
    try:
        from bcc import BPF  # Debian's python3-bpfcc, seen through --system-site-packages
        from bcc.libbcc import lib as libbcc
    except ImportError:
        raise DependencyError("the BCC Python module is missing: install python3-bpfcc (make setup does)") from None
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if not build.exists() and not os.environ.get("BCC_KERNEL_SOURCE"):
        raise DependencyError(f"no kernel headers at {build}: run make setup (it links the distribution's headers)")
    return BPF, libbcc


def compile_programs(BPF, pdir: Path, flags: list[str]):
    """Compile both programs as ONE BCC text, maps pinned under ``pdir``: (bpf, xdp function, egress function)."""
    cflags = [f"-I{BPF_DIR}", f'-DPIN_DIR="{pdir}"', "-w", *flags]
    try:
        bpf = BPF(text="\n".join(p.read_text() for p in SOURCES).encode(), cflags=cflags)
        return bpf, bpf.load_func(b"xdp_port_flow", BPF.XDP), bpf.load_func(b"tc_egress", BPF.SCHED_CLS)
    except Exception as exc:
        raise BpfError(f"the XDP program failed to compile or load ({exc}): the compiler output is in the log; `python -m app doctor` checks headers and BPF support") from None


def _load(interface: str, pdir: Path, mode: str, want_hash: str, flags: list[str], recreate: bool,
          prefill: list[str] = ()) -> dict:
    BPF, libbcc = bcc_modules()
    pdir.mkdir(parents=True, exist_ok=True)
    old = read_meta(pdir)       # before a recreate retires it: whether portwatch added the clsact qdisc
    pin_owner.record_load(pdir, "compiling")
    if recreate:
        retire_pins(pdir)
    try:
        return _build_and_attach(BPF, libbcc, interface, pdir, mode, want_hash, flags, recreate, prefill, old)
    except BaseException:
        if recreate and retired_still_attached(interface, pdir):
            restore_pins(pdir)           # the old program never stopped: put its pins back
        raise


def _build_and_attach(BPF, libbcc, interface: str, pdir: Path, mode: str, want_hash: str, flags: list[str],
                      recreate: bool, prefill: list[str], old: PwMeta | None) -> dict:
    """Compile (maps reused or created), prefill the blacklist, pin and record the program, attach."""
    unborn = {name for name in MAP_LAYOUT if not (pdir / name).exists()}
    started = time.process_time() + _children_cpu()
    t0 = time.monotonic()
    bpf, fn, eg_fn = compile_programs(BPF, pdir, flags)
    compile_seconds = time.monotonic() - t0
    prefilled = prefill_blacklist(pdir, prefill)
    born = {}
    for name in sorted(unborn):
        with maps.PinnedMap(pdir / name) as m:
            born[name] = m.info.id
    prog_pin = pdir / "prog"
    prog_pin.unlink(missing_ok=True)
    if libbcc.bpf_obj_pin(fn.fd, str(prog_pin).encode()) != 0:       # pinned first: it is never unrecorded
        raise BpfError(f"cannot pin the program at {prog_pin}")
    identity = maps.prog_info(prog_pin)
    if born:
        pin_owner.note_born(pdir, born.values())
    pin_owner.record_load(pdir, "attaching", program_id=identity.id, program_tag=bytes(identity.tag).hex(),
                          retired=recreate)
    attached = attached_program(interface)
    flag_of = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
    if mode == "auto":
        wanted = [flag_of[m] for m in egress.auto_modes(interface)[0]]
    elif mode in flag_of:
        wanted = [flag_of[mode]]
    else:
        raise UsageError(f"xdp_mode must be auto, native or generic, not {mode!r}")
    used, last_err = None, None
    for flag in wanted:
        want_mode = "native" if flag == XDP_FLAGS_DRV_MODE else "generic"
        if attached and attached[1] != want_mode:
            # the kernel refuses to switch modes in place: detach the other mode first
            subprocess.run(["ip", "link", "set", "dev", interface,
                            "xdpgeneric" if attached[1] == "generic" else "xdpdrv", "off"], capture_output=True)
            attached = None
        try:
            bpf.attach_xdp(interface, fn, flag)
            used = want_mode
            break
        except Exception as exc:  # BCC raises plain Exception
            last_err = exc
    if used is None:
        raise BpfError(f"cannot attach XDP to {interface} ({last_err})")
    now = attached_program(interface)
    program_id = now[0] if now else 0
    eg_pin = pdir / egress.PROG_PIN
    eg_pin.unlink(missing_ok=True)
    if libbcc.bpf_obj_pin(eg_fn.fd, str(eg_pin).encode()) != 0:
        raise BpfError(f"cannot pin the egress program at {eg_pin}")
    eg_id, clsact_added = egress.attach(interface, pdir)
    meta = PwMeta()
    meta.egress_program_id = eg_id
    # portwatch added the qdisc now, or an earlier load of ours did (kept across reloads)
    meta.flags = META_CLSACT_ADDED if clsact_added or (old is not None and old.flags & META_CLSACT_ADDED) else 0
    ctypes.memmove(meta.source_hash, bytes.fromhex(want_hash), 32)
    meta.loaded_at = int(time.time())
    meta.program_id = program_id
    meta.mode = MODE_NUMBERS[used]
    with maps.PinnedMap(pdir / "meta") as m:
        m.update(maps.INDEX_0, bytes(meta))
    pin_owner.record_load(pdir, "attached", program_id=program_id, program_tag=bytes(identity.tag).hex(), mode=used,
                          retired=recreate, attach=libxdp.attach_text())
    return {"mode": used, "program_id": program_id, "egress_program_id": eg_id,
            "compile_seconds": round(compile_seconds, 3),
            "cpu_seconds": round(time.process_time() + _children_cpu() - started, 3),
            "maps_created": len(unborn) == len(MAP_LAYOUT), "retired": recreate, "prefilled": prefilled}


def _children_cpu() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def loader_main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m app.services.kernel.xdp")
    sub = parser.add_subparsers(dest="cmd", required=True)
    load = sub.add_parser("load", help="compile with BCC, attach, pin (prints JSON)")
    load.add_argument("--interface", required=True)
    load.add_argument("--pin-dir", required=True, type=Path)
    load.add_argument("--mode", default="auto")
    load.add_argument("--hash", required=True)
    load.add_argument("--recreate", action="store_true")
    load.add_argument("--flag", action="append", default=[])
    load.add_argument("--ebpf", action="store_true", help="print the C source with its flags and exit")
    args = parser.parse_args(argv)
    if args.ebpf:
        print("// cflags:", " ".join(args.flag))
        print("\n".join(p.read_text() for p in SOURCES))
        return 0
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        request = json.loads(sys.stdin.read() or "{}") if not sys.stdin.isatty() else {}
        result = _load(args.interface, args.pin_dir, args.mode, args.hash, args.flag, args.recreate,
                       request.get("prefill", []))
    except (BpfError, DependencyError, UsageError) as exc:
        print(str(exc))
        return exc.exit_code
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(loader_main())
