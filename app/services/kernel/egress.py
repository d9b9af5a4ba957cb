"""The TC egress program's attachment: clsact qdisc, the egress filter, its description and removal;
and which XDP mode costs less on an interface's driver (:func:`auto_modes`).

The program (bpf/egress.c) is compiled with the XDP program in ONE BCC object by the loader process of
xdp_loader.py (the only BCC user) and pinned as ``<pin_dir>/eg_prog``; this module only runs ``tc``
(iproute2) against that pin, so it needs no BCC. Its maps (``eg_*``) are read through libbpf (maps.py).
"""
from __future__ import annotations

import json
import logging
import subprocess
from functools import lru_cache
from pathlib import Path

from app.errors import BpfError

log = logging.getLogger(__name__)

EGRESS_PREF = 49152          # tc filter preference of portwatch's egress filter
PROG_PIN = "eg_prog"


def _tc(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(["tc", *args], capture_output=True, text=True, check=check)


def has_clsact(interface: str) -> bool:
    out = _tc("-j", "qdisc", "show", "dev", interface)
    try:
        return any(q.get("kind") == "clsact" for q in json.loads(out.stdout or "[]"))
    except json.JSONDecodeError:
        return False


def attached_egress(interface: str) -> int | None:
    """The program id of portwatch's egress filter on ``interface`` (None when there is none)."""
    out = _tc("-j", "filter", "show", "dev", interface, "egress")
    if out.returncode != 0:
        return None
    try:
        filters = json.loads(out.stdout or "[]")
    except json.JSONDecodeError:
        return None
    for f in filters:
        if f.get("pref") == EGRESS_PREF and f.get("kind") == "bpf":
            prog = (f.get("options") or {}).get("prog") or {}
            if prog.get("id"):
                return int(prog["id"])
    return None


def attach(interface: str, pdir: Path) -> tuple[int, bool]:
    """Attach the pinned egress program (replacing our earlier filter). Returns (program id, whether
    this call added the clsact qdisc)."""
    added = False
    if not has_clsact(interface):
        res = _tc("qdisc", "add", "dev", interface, "clsact")
        if res.returncode != 0:
            raise BpfError(f"cannot add a clsact qdisc to {interface} for the egress program ({res.stderr.strip()})")
        added = True
    _tc("filter", "del", "dev", interface, "egress", "pref", str(EGRESS_PREF))
    res = _tc("filter", "add", "dev", interface, "egress", "pref", str(EGRESS_PREF), "bpf", "direct-action",
              "object-pinned", str(Path(pdir) / PROG_PIN))
    if res.returncode != 0:
        raise BpfError(f"cannot attach the egress program to {interface} ({res.stderr.strip()})")
    prog_id = attached_egress(interface)
    if prog_id is None:
        raise BpfError(f"the egress program was attached to {interface} but tc does not show it")
    return prog_id, added


def detach(interface: str, remove_clsact: bool) -> list[str]:
    """Remove portwatch's egress filter (and the clsact qdisc when portwatch added it).

    portwatch's filter is the one at preference EGRESS_PREF on the interface's clsact egress hook. The
    clsact qdisc goes only when portwatch added it (``remove_clsact``: recorded in the ``meta`` map's
    flags, PW_META_CLSACT_ADDED), so another tool's TC programs are never taken down with ours."""
    done = []
    if not Path(f"/sys/class/net/{interface}").exists():
        return done
    prog_id = attached_egress(interface)
    if prog_id is not None:
        _tc("filter", "del", "dev", interface, "egress", "pref", str(EGRESS_PREF))
        done.append(f"detached TC egress program {prog_id} from {interface}")
    if remove_clsact and has_clsact(interface):
        _tc("qdisc", "del", "dev", interface, "clsact")
        done.append(f"removed the clsact qdisc portwatch added to {interface}")
    return done


# --- which XDP mode costs less ------------------------------------------------------------------

# drivers whose native XDP is a copy path or emulated (measured: on veth, native measured 0.71x of no
# program and generic 0.81x in the same run): generic costs less there
VIRTUAL_DRIVERS = frozenset({"veth", "tun", "tap", "bridge", "bond", "team", "dummy", "macvlan", "macvtap", "ipvlan",
                             "vxlan", "geneve", "gre", "gretap", "ipip", "sit", "ip6tnl", "wireguard", "vrf", "ifb",
                             "netkit", "nlmon", "vcan", "loopback"})


@lru_cache(maxsize=64)
def driver_of(interface: str) -> str:
    """The interface's driver: the link kind of a virtual device (``veth``), else the bound driver's
    name (``virtio_net``, ``mlx5_core``), else 'unknown'. Cached per process (asked every round)."""
    out = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", interface], capture_output=True, text=True)
    try:
        link = json.loads(out.stdout or "[]")[0]
    except (json.JSONDecodeError, IndexError):
        link = {}
    kind = (link.get("linkinfo") or {}).get("info_kind")
    if kind:
        return kind
    if link.get("link_type") == "loopback":
        return "loopback"
    drv = Path(f"/sys/class/net/{interface}/device/driver")
    return drv.resolve().name if drv.exists() else "unknown"


def auto_modes(interface: str) -> tuple[list[str], str]:
    """The XDP modes to try, in order, for ``xdp_mode = auto``, and the driver that decided it."""
    driver = driver_of(interface)
    if driver in VIRTUAL_DRIVERS:
        return ["generic"], driver
    return ["native", "generic"], driver


def mode_text(settings, interface: str, mode: str | None) -> str | None:
    """The XDP mode as recorded in rounds.xdp_mode and shown by status: with why under ``auto``,
    e.g. 'generic (auto: veth)'."""
    if not mode or settings.collector.xdp_mode != "auto":
        return mode
    return f"{mode} (auto: {driver_of(interface)})"


def programs_text(info: dict) -> str:
    """One line for status: both programs of an interface (``info`` from xdp.describe), e.g.
    'XDP 41 (generic on veth, ours), TC egress 42 (ours)'."""
    if info.get("attached"):
        on = f" on {info['driver']}" if info.get("driver") else ""
        xdp_part = f"XDP {info['program_id']} ({info['mode']}{on}, {'ours' if info.get('ours') else 'not portwatch'})"
    else:
        xdp_part = "XDP none"
    if info.get("egress_attached"):
        eg_part = f"TC egress {info['egress_program_id']} ({'ours' if info.get('egress_ours') else 'not portwatch'})"
    else:
        eg_part = "TC egress none"
    return f"{xdp_part}, {eg_part}"

