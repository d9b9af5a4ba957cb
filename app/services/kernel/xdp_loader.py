"""The loader process: compile both programs with BCC, pin, prefill, attach — the only importer of BCC.

Run by app/services/kernel/xdp.py's run_loader as ``python -m app.services.kernel.xdp_loader load ...``
(JSON result on stdout, the prefill CIDRs on stdin), never imported by the collector: BCC's LLVM stays
out of every other process (app/services/kernel/xdp_unattached.py borrows its compile step).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from app.errors import BpfError, DependencyError, UsageError
from app.services.kernel import egress, libxdp, maps, pin_owner
from app.services.kernel.attachment import xdp_attachment as attached_program
from app.services.kernel.bpf_structs import META_CLSACT_ADDED, MAP_LAYOUT, PwMeta
from app.services.kernel.xdp import BPF_DIR, SOURCES, read_meta
from app.services.kernel.xdp_steps import prefill_blacklist, restore_pins, retire_pins, retired_still_attached

log = logging.getLogger(__name__)

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
MODE_NUMBERS = {"native": 1, "generic": 2}


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
    used = _attach_xdp(bpf, fn, interface, mode)
    now = attached_program(interface)
    program_id = now[0] if now else 0
    eg_pin = pdir / egress.PROG_PIN
    eg_pin.unlink(missing_ok=True)
    if libbcc.bpf_obj_pin(eg_fn.fd, str(eg_pin).encode()) != 0:
        raise BpfError(f"cannot pin the egress program at {eg_pin}")
    eg_id, clsact_added = egress.attach(interface, pdir)
    _write_meta(pdir, want_hash, program_id, used, eg_id, clsact_added, old)
    pin_owner.record_load(pdir, "attached", program_id=program_id, program_tag=bytes(identity.tag).hex(), mode=used,
                          retired=recreate, attach=libxdp.attach_text())
    return {"mode": used, "program_id": program_id, "egress_program_id": eg_id,
            "compile_seconds": round(compile_seconds, 3),
            "cpu_seconds": round(time.process_time() + _children_cpu() - started, 3),
            "maps_created": len(unborn) == len(MAP_LAYOUT), "retired": recreate, "prefilled": prefilled}


def _attach_xdp(bpf, fn, interface: str, mode: str) -> str:
    """Attach the compiled XDP function in ``mode`` (auto: the modes egress.auto_modes picks, in order);
    returns the mode used, 'native' or 'generic'."""
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
    return used


def _write_meta(pdir: Path, want_hash: str, program_id: int, used: str, eg_id: int, clsact_added: bool,
                old: PwMeta | None) -> None:
    """Record the attached programs, their mode and source hash in the pinned ``meta`` map."""
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


def _children_cpu() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def loader_main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m app.services.kernel.xdp_loader")
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
