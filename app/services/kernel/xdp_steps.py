"""The loader's fail-closed steps (a failed load never leaves the interface unprotected), apart from the
compile/attach code of app/services/kernel/xdp_loader.py: a recreate retires the running program's pins
(:func:`retire_pins`), puts them back when the swap never happened (:func:`retired_still_attached`,
:func:`restore_pins`), and fills the new blacklist map BEFORE the attach (:func:`prefill_blacklist`). The
retired maps are frozen once the new program replaced the old one; the collector then closes a last round
from them (Collector.close_retired) and removes them, so a recreate loses no count and the blocklist is
enforced by the new program from its first packet.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
from pathlib import Path

from app.errors import BpfError
from app.services.kernel import maps
from app.services.kernel.bpf_structs import MAP_LAYOUT, PwBlacklistValue, lpm_key
from app.services.kernel.attachment import xdp_attachment as attached_program

log = logging.getLogger(__name__)

RETIRED = "retired"          # <pin_dir>/retired/: maps replaced by a recreate, until their last round is closed
PROGRAM_PINS = ("prog", "eg_prog")     # the XDP and TC egress programs (app/services/kernel/egress.py PROG_PIN)


def retire_pins(pdir: Path) -> None:
    """Move the pinned maps and programs to ``<pdir>/retired/``: the attached programs keep counting into
    them until the new ones replace them, and the collector then closes a last round from them."""
    retired = pdir / RETIRED
    if retired.exists():          # the collector closes these before it loads again; stale otherwise
        shutil.rmtree(retired, ignore_errors=True)
    retired.mkdir()
    for name in (*MAP_LAYOUT, *PROGRAM_PINS):
        if (pdir / name).exists():
            os.rename(pdir / name, retired / name)


def retired_still_attached(interface: str, pdir: Path) -> bool:
    """True when the XDP program of ``<pdir>/retired`` is still the attached one (the swap never happened)."""
    prog = pdir / RETIRED / "prog"
    attached = attached_program(interface) if Path(f"/sys/class/net/{interface}").exists() else None
    try:
        return bool(attached) and prog.exists() and maps.prog_info(prog).id == attached[0]
    except BpfError:
        return False


def restore_pins(pdir: Path) -> None:
    """Undo :func:`retire_pins`: the retired pins go back in place of whatever was pinned since."""
    retired = pdir / RETIRED
    for path in sorted(retired.iterdir()):
        (pdir / path.name).unlink(missing_ok=True)
        os.rename(path, pdir / path.name)
    retired.rmdir()
    log.warning("the reload of %s did not happen: the running program's maps are pinned again", pdir.name)


def prefill_blacklist(pdir: Path, cidrs: list[str]) -> list[str]:
    """Write ``cidrs`` (the ledger's active entries) into the blacklist map in ``pdir`` BEFORE the program
    that consults it is attached; an entry already there keeps its drop counter. Returns those written."""
    new = []
    with maps.PinnedMap(pdir / "blacklist") as m:
        for text in cidrs:
            key = lpm_key(ipaddress.ip_network(text, strict=False))
            if m.lookup(key) is None:
                try:
                    m.update(key, bytes(PwBlacklistValue()))
                except BpfError as exc:           # a full map: the collector's reconcile reports it
                    log.warning("cannot prefill %s: %s", text, exc)
                    continue
                new.append(text)
    return new
