"""Packet metadata sample for one round: pyshark drives dumpcap + tshark for a bounded window
(:class:`Sniffer`; one packet's fields: :func:`record_from_fields`, pure, for the tests too).

How the capture is run, and the pyshark traps it avoids: app/services/collector/capture.py. Imported
by the sniffer thread and by sniffer_file.py (a capture file read the same way, for replay).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

from app.errors import DependencyError, PortwatchError, UsageError
from app.services.host import local_address_set
from app.services.ports import protocol_name

log = logging.getLogger(__name__)

# tshark fields printed for every packet (tshark -T json -e ...). All exist since Wireshark 3.0.
FIELDS = (
    "frame.time_epoch", "frame.len", "frame.protocols",
    "ip.src", "ip.dst", "ip.proto", "ipv6.src", "ipv6.dst", "ipv6.nxt",
    "tcp.srcport", "tcp.dstport", "tcp.len", "udp.srcport", "udp.dstport", "udp.length",
    "icmp.type", "icmpv6.type",
    "dns.flags.response", "dns.qry.name", "dns.resp.name", "dns.qry.type", "dns.flags.rcode",
    "tls.handshake.extensions_server_name",
)
TRANSPORTS = frozenset({"tcp", "udp", "udplite", "sctp", "icmp", "icmpv6", "igmp", "gre", "esp", "ah"})
ICMP_TYPES = {"icmp": "icmp.type", "icmpv6": "icmpv6.type"}
DNS_ROOT = "<Root>"            # tshark's name for the EDNS OPT pseudo-record: not an answer
MAX_NAME_CHARS = 255           # a DNS name is at most 253 characters; longer text is garbage
MAX_NAMES_CHARS = 1024         # resp_name: comma-separated names
READ_BYTES = 1 << 16
POLL_SECONDS = 0.25            # how often the stop event is checked while no packet arrives


class PacketRecord(NamedTuple):
    """One sampled packet (metadata only), as returned in :attr:`SniffResult.records`.

    Each record holds the time, tshark's protocol stack (``frame.protocols``), addresses, ports,
    transport, L4 payload length, frame length, the DNS query name and answer names, and the TLS /
    QUIC server name (SNI) where tshark decodes one. Payload bytes are never read or stored.

    timestamp: capture time, epoch seconds; protocols: tshark's frame.protocols
    ('eth:ethertype:ip:udp:dns'); transport: 'tcp', 'udp', 'icmp', 'icmpv6', ... or None (ARP, ...);
    src_address/dst_address: outer IP addresses as text or None; src_port/dst_port: TCP/UDP ports or
    None; local_port: the port that is this host's side (the destination port when the destination
    is a local address, else the source port when the source is, else the destination port; the
    ICMP type for ICMP/ICMPv6) - the key port_stats uses, before folding; qry_name: first DNS query
    name; resp_name: names of the DNS response's records, comma separated; server_name: TLS or
    QUIC SNI; payload: L4 payload bytes (TCP/UDP) or None; length: frame bytes; qry_type: the
    first DNS question's record type (1 A, 5 CNAME, 10 NULL, 16 TXT, 28 AAAA, ...) or None; rcode:
    a DNS *response's* code (0 NOERROR, 3 NXDOMAIN, 5 REFUSED, ...), None for a query or non-DNS.
    """

    timestamp: float
    protocols: str | None
    transport: str | None
    src_address: str | None
    dst_address: str | None
    src_port: int | None
    dst_port: int | None
    local_port: int | None
    qry_name: str | None
    resp_name: str | None
    server_name: str | None
    payload: int | None
    length: int
    qry_type: int | None = None
    rcode: int | None = None


class SniffResult(NamedTuple):
    """What one capture window produced.

    records: [PacketRecord], at most max_packets; skipped: packets that could not be turned into
    a record; limit_reached: max_packets was hit before the window ended; stopped_early: the stop
    event ended the window; window_seconds: the window asked for; started_at/finished_at: epoch
    seconds of the run (finished_at includes the drain and cleanup).
    """

    records: list
    skipped: int
    limit_reached: bool
    stopped_early: bool
    window_seconds: float
    started_at: float
    finished_at: float

    @property
    def packets(self) -> int:
        """Packets tshark delivered in the window (records + skipped)."""
        return len(self.records) + self.skipped


def window_seconds(round_seconds: float, window_fraction: float) -> float:
    """Capture window for a round: ``window_fraction x round_seconds`` seconds, fraction clamped
    to [0, 0.95] so the drain and cleanup still fit inside the round."""
    return max(0.0, float(round_seconds) * min(max(float(window_fraction), 0.0), 0.95))


def find_tshark(tshark_path: str = "") -> str:
    """Path of the tshark to run: ``tshark_path`` when set (it must exist), else tshark on PATH
    or in /usr/bin and /usr/sbin (cron's PATH is minimal). dumpcap must sit beside it or be on
    PATH. Raises DependencyError with one sentence naming the fix."""
    if tshark_path:
        path = Path(tshark_path)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DependencyError(f"tshark not found at {tshark_path} (setting sniffer.tshark_path): "
                                  "install tshark (apt-get install tshark) or fix the setting")
        found = str(path)
    else:
        found = shutil.which("tshark") or shutil.which("tshark", path="/usr/bin:/usr/sbin:/usr/local/bin")
        if not found:
            raise DependencyError("tshark is not installed: install it (apt-get install tshark) "
                                  "or set sniffer.enabled = false")
    if _find_dumpcap(found) is None:
        raise DependencyError(f"dumpcap not found beside {found} or on PATH: install it (apt-get install tshark)")
    return found


def _find_dumpcap(tshark: str) -> str | None:
    """dumpcap beside ``tshark`` (what pyshark runs), else on PATH."""
    beside = Path(tshark).with_name("dumpcap")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("dumpcap") or shutil.which("dumpcap", path="/usr/bin:/usr/sbin:/usr/local/bin")


# ---------------------------------------------------------------------------------------------
# parsing: tshark -T json -e ... prints {"_source": {"layers": {"ip.src": ["198.18.0.1"], ...}}}
# ---------------------------------------------------------------------------------------------
def _first(fields: dict, name: str) -> str | None:
    values = fields.get(name)
    if not values:
        return None
    value = values[0] if isinstance(values, list) else values
    if not isinstance(value, str):
        raise TypeError(f"{name}: {value!r} is not text")
    return value


def _int(fields: dict, name: str) -> int | None:
    value = _first(fields, name)
    return None if value is None else int(value, 10)


def _name(value: str | None, limit: int = MAX_NAME_CHARS) -> str | None:
    if not value:
        return None
    return value[:limit]


def record_from_fields(fields: dict, local: frozenset[str] | set[str]) -> PacketRecord:
    """Turn one packet's tshark fields ({field: [text, ...]}) into a PacketRecord.

    local: this host's addresses (decides ``local_port``). Raises ValueError / TypeError /
    KeyError for a packet that cannot be described (the caller skips and counts it).
    """
    if not isinstance(fields, dict):
        raise TypeError("packet fields are not an object")
    timestamp = float(_first(fields, "frame.time_epoch"))   # TypeError when absent
    length = _int(fields, "frame.len")
    if length is None or length < 0:
        raise ValueError("frame.len missing or negative")
    protocols = _name(_first(fields, "frame.protocols"), 512)
    layers = protocols.split(":") if protocols else []

    network = next((layer for layer in layers if layer in ("ip", "ipv6")), None)
    transport = None
    src_address = dst_address = None
    if network is not None:
        src_address = _first(fields, f"{network}.src")
        dst_address = _first(fields, f"{network}.dst")
        after = layers[layers.index(network) + 1:]
        transport = next((layer for layer in after if layer in TRANSPORTS), None)
        if transport is None:                        # non-first fragment, unknown protocol, ...
            number = _int(fields, "ip.proto" if network == "ip" else "ipv6.nxt")
            transport = protocol_name(number) if number is not None else None

    src_port = dst_port = local_port = payload = None
    if transport in ("tcp", "udp"):
        src_port = _int(fields, f"{transport}.srcport")
        dst_port = _int(fields, f"{transport}.dstport")
        if transport == "tcp":
            payload = _int(fields, "tcp.len")
        else:
            udp_length = _int(fields, "udp.length")
            payload = None if udp_length is None else max(udp_length - 8, 0)
        if dst_address in local or src_address not in local:
            local_port = dst_port
        else:
            local_port = src_port
    elif transport in ICMP_TYPES:
        local_port = _int(fields, ICMP_TYPES[transport])

    qry_name = _name(_first(fields, "dns.qry.name"))
    resp_name = rcode = None
    qry_type = _int(fields, "dns.qry.type") if qry_name is not None else None
    if _first(fields, "dns.flags.response") in ("1", "True", "true"):
        rcode = _int(fields, "dns.flags.rcode")
        names = [n for n in dict.fromkeys(fields.get("dns.resp.name") or []) if isinstance(n, str) and n != DNS_ROOT]
        resp_name = _name(",".join(n[:MAX_NAME_CHARS] for n in names), MAX_NAMES_CHARS)
    server_name = _name(_first(fields, "tls.handshake.extensions_server_name"))
    return PacketRecord(timestamp, protocols, transport, src_address, dst_address, src_port, dst_port,
                        local_port, qry_name, resp_name, server_name, payload, length, qry_type, rcode)


# ---------------------------------------------------------------------------------------------
# the capture
# ---------------------------------------------------------------------------------------------
class Sniffer:
    """One bounded live capture on ``interface``.

    window_seconds: how long to capture (seconds; see :func:`window_seconds`); max_packets: cap per
    window; bpf_filter: capture filter for dumpcap (``-f``), '' for everything; tshark_path: ''
    finds tshark (:func:`find_tshark`); temp_root: where the private temp directory is made (created
    when missing; None: the system's temp dir); stop_event: a threading.Event that ends the window early;
    drain_seconds: how long tshark may take to flush after the window before it is killed.

    :attr:`receiving` is set when tshark delivers the first packet of a run (tshark starts about
    0.5-1 s after :meth:`run`; the start-up is inside the window). dumpcap's "Capturing on" line
    comes before the interface is really open, so it is no signal that packets are seen.
    """

    def __init__(self, interface: str, window_seconds: float, max_packets: int = 5000, bpf_filter: str = "",
                 tshark_path: str = "", temp_root: str | os.PathLike | None = None,
                 stop_event: threading.Event | None = None, drain_seconds: float = 2.0):
        self.interface = interface
        self.window_seconds = max(0.0, float(window_seconds))
        self.max_packets = max(1, int(max_packets))
        self.bpf_filter = bpf_filter
        self.tshark_path = tshark_path
        self.temp_root = temp_root
        self.stop_event = stop_event or threading.Event()
        self.drain_seconds = max(0.0, float(drain_seconds))
        self.receiving = threading.Event()
        self.temp_dir: str | None = None          # the private temp dir of the last run (removed)
        self.pids: list[int] = []                 # dumpcap and tshark of the last run (for checks)
        self._records: list[PacketRecord] = []
        self._skipped = 0
        self._local: frozenset[str] = frozenset()

    def check(self) -> str:
        """Raise DependencyError when tshark/dumpcap/pyshark are missing, UsageError when the
        interface does not exist; return the tshark path."""
        tshark = find_tshark(self.tshark_path)
        try:
            import pyshark  # noqa: F401 - heavy: imported only when a capture is about to run
        except ImportError:
            raise DependencyError("the pyshark Python package is missing: install the requirements "
                                  "(.venv/bin/pip install -r requirements.txt)") from None
        if self.interface != "any" and not Path("/sys/class/net", self.interface).exists():
            raise UsageError(f"interface {self.interface} does not exist: name one from `ip link`")
        return tshark

    def run(self) -> SniffResult:
        """Capture for the window (or until max_packets or the stop event); never longer than
        ``window_seconds + drain_seconds`` plus process reaping. Leaves no process and no file.

        Cost (measured on the 2-core dev machine, veth lab, 33k small UDP packets offered): 5000 records
        (the cap) arrived 0.9 s after the capture was live, i.e. ~5.5k packets/s through tshark; the
        whole run took ~0.6 CPU-s in Python (imports included) and ~1.5 CPU-s in dumpcap + tshark.
        Start-up (``tshark -D``, ``tshark -v``, tshark's own start) is ~0.6-2 s and counts inside the
        window. The window is ``window_fraction x round_seconds`` (45 s of a 60 s round by default), so
        the capture never makes a round late.
        """
        started_at = time.time()
        deadline = time.monotonic() + self.window_seconds
        tshark = self.check()
        self._records, self._skipped, self.pids = [], 0, []
        self.receiving.clear()
        self._local = local_address_set()
        if self.temp_root is not None:
            Path(self.temp_root).mkdir(parents=True, exist_ok=True)
        self.temp_dir = tempfile.mkdtemp(prefix="portwatch-sniffer-", dir=self.temp_root)
        loop = asyncio.new_event_loop()
        try:
            limit_reached, stopped_early = loop.run_until_complete(self._capture(tshark, deadline, loop))
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                shutil.rmtree(self.temp_dir, ignore_errors=True)
        result = SniffResult(self._records, self._skipped, limit_reached, stopped_early, self.window_seconds,
                             started_at, time.time())
        log.debug("sniffer: %d records, %d skipped in %.1f s on %s", len(result.records), result.skipped,
                  result.finished_at - started_at, self.interface)
        return result

    async def _capture(self, tshark: str, deadline: float, loop) -> tuple[bool, bool]:
        """Run dumpcap | tshark until the deadline, drain, clean up. Returns (limit_reached,
        stopped_early)."""
        from app.services.collector.capture import REAP_SECONDS, PrivateLiveCapture
        capture = PrivateLiveCapture(interface=self.interface, bpf_filter=self.bpf_filter or None, tshark_path=tshark,
                                     temp_dir=self.temp_dir, eventloop=loop,
                                     custom_parameters=["--temp-dir", self.temp_dir] +
                                     [arg for field in FIELDS for arg in ("-e", field)])
        parser = capture._setup_tshark_output_parser()
        stopped_early = False
        try:
            process = await capture._get_tshark_process(packet_count=self.max_packets)
            self.pids = [p.pid for p in capture.sessions]
            data = b""
            feeding = True
            drain_deadline = None
            while True:
                data = self._take_packets(parser, data)
                if feeding and (time.monotonic() >= deadline or self.stop_event.is_set()
                                or len(self._records) + self._skipped >= self.max_packets):
                    stopped_early = self.stop_event.is_set() and time.monotonic() < deadline
                    capture.stop_feeding()
                    feeding = False
                    drain_deadline = time.monotonic() + self.drain_seconds
                limit = deadline if feeding else drain_deadline
                remaining = limit - time.monotonic()
                if not feeding and remaining <= 0:
                    log.debug("sniffer: tshark did not finish within %.1f s after the window", self.drain_seconds)
                    break
                try:
                    chunk = await asyncio.wait_for(process.stdout.read(READ_BYTES),
                                                   max(0.0, min(remaining, POLL_SECONDS)))
                except asyncio.TimeoutError:
                    continue
                if not chunk:                       # tshark exited: -c reached, input ended, or it failed
                    self._take_packets(parser, data)
                    try:                            # let it exit by itself, so its status tells why
                        await asyncio.wait_for(process.wait(), REAP_SECONDS)
                    except asyncio.TimeoutError:
                        pass
                    break
                data += chunk
        finally:
            await capture.kill_all()
        seen = len(self._records) + self._skipped
        failure = capture.failure()
        if failure and not seen:
            raise PortwatchError(f"capture on {self.interface} failed: {failure}")
        return seen >= self.max_packets, stopped_early

    def _take_packets(self, parser, data: bytes) -> bytes:
        """Turn every complete packet in ``data`` into a record; return the incomplete rest."""
        while True:
            got_first = bool(self._records) or self._skipped > 0
            chunk, data = parser._extract_packet_from_data(data, got_first_packet=got_first)
            if not chunk:
                return data
            if len(self._records) + self._skipped >= self.max_packets:
                continue
            try:
                fields = json.loads(chunk)["_source"]["layers"]
                self._records.append(record_from_fields(fields, self._local))
                self.receiving.set()
            except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
                self._skipped += 1
                log.debug("sniffer: skipped a packet tshark printed: %s", exc)
