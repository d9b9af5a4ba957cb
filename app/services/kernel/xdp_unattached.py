"""The programs of bpf/ compiled and pinned with nothing attached: what a replay feeds packets to with
BPF_PROG_TEST_RUN (app/services/kernel/prog_run.py). The same BCC text and -D flags as a live load
(app/services/kernel/xdp_loader.py), in the same kind of separate loader process (BCC never enters the caller).

    build_unattached(settings, pdir) -> {"program_id", "egress_program_id", "compile_seconds"}

``pdir`` gets ``prog`` (XDP port_flow), ``eg_prog`` (TC egress), every map and the ``meta`` record.
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

from app.errors import BpfError, DependencyError
from app.services.kernel import egress, maps, xdp, xdp_loader
from app.services.kernel.bpf_structs import PwMeta

log = logging.getLogger(__name__)


def build_unattached(settings, pdir: Path) -> dict:
    """Compile both programs (the same text and flags as a live load) into ``pdir`` — programs pinned as
    ``prog`` / ``eg_prog``, maps pinned beside them, nothing attached anywhere: a replay feeds them
    packets with BPF_PROG_TEST_RUN. Runs the BCC loader in its own process, like :func:`app.services.kernel.xdp.run_loader`."""
    cmd = [sys.executable, "-m", "app.services.kernel.xdp_unattached", "--pin-dir", str(pdir), "--hash", xdp.source_hash(settings)]
    cmd += ["--flag=" + f for f in xdp.build_flags(settings)]
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(xdp.BPF_DIR.parent))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        log.error("XDP loader said:\n%s", proc.stderr.strip()[-4000:])
        msg = (proc.stdout.strip().splitlines() or proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise (DependencyError if proc.returncode == 7 else BpfError)(msg)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _build(pdir: Path, want_hash: str, flags: list[str]) -> dict:
    """The loader process's side of :func:`build_unattached`."""
    BPF, libbcc = xdp_loader.bcc_modules()
    pdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    _bpf, xdp_fn, eg_fn = xdp_loader.compile_programs(BPF, pdir, flags)
    fns = {"prog": xdp_fn, egress.PROG_PIN: eg_fn}
    for name, fn in fns.items():
        if libbcc.bpf_obj_pin(fn.fd, str(pdir / name).encode()) != 0:
            raise BpfError(f"cannot pin the program at {pdir / name}")
    meta = PwMeta()
    ctypes.memmove(meta.source_hash, bytes.fromhex(want_hash), 32)
    meta.loaded_at = int(time.time())
    meta.program_id = maps.prog_info(pdir / "prog").id
    meta.egress_program_id = maps.prog_info(pdir / egress.PROG_PIN).id
    with maps.PinnedMap(pdir / "meta") as m:
        m.update(maps.INDEX_0, bytes(meta))
    return {"program_id": meta.program_id, "egress_program_id": meta.egress_program_id,
            "compile_seconds": round(time.monotonic() - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m app.services.kernel.xdp_unattached",
                                     description="compile with BCC and pin, attach nothing (prints JSON)")
    parser.add_argument("--pin-dir", required=True, type=Path)
    parser.add_argument("--hash", required=True)
    parser.add_argument("--flag", action="append", default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        print(json.dumps(_build(args.pin_dir, args.hash, args.flag)))
    except (BpfError, DependencyError) as exc:
        print(str(exc))
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
