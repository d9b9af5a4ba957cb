"""The sniffer's fields (DNS names, TLS server names, protocol stacks) from a capture file: pyshark's
FileCapture running tshark with the same field selection and the same record builder as the live sniffer
(app/services/collector/sniffer.py), so a replayed round's ``packets`` rows are what a live round's would be.

    write_pcap(path, capture, indexes)          the chosen packets of a Capture as a pcap (ns timestamps)
    records_from_file(path, local, tshark_path) -> (records, skipped)
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
from pathlib import Path

from app.errors import DependencyError
from app.services.collector import sniffer

log = logging.getLogger(__name__)


def write_pcap(path: str | Path, capture, indexes) -> int:
    """Write packets ``indexes`` of ``capture`` (app.services.collector.capture_file.Capture) to a pcap file with
    nanosecond timestamps, Ethernet frames. Returns the number written."""
    buf, off, length, ts = capture.buffer, capture.offsets, capture.lengths, capture.ts_ns
    head = struct.Struct("<IIII")
    n = 0
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1))
        for i in indexes:
            o, size, t = int(off[i]), int(length[i]), int(ts[i])
            fh.write(head.pack(t // 1_000_000_000, t % 1_000_000_000, size, size))
            fh.write(buf[o:o + size])
            n += 1
    return n


def records_from_file(path: str | Path, local: set[str] | frozenset[str], tshark_path: str = ""
                      ) -> tuple[list[sniffer.PacketRecord], int]:
    """Every packet of the file as a sniffer PacketRecord (``local``: this host's addresses, which decide
    each record's local port). Returns (records, packets tshark printed that could not be described)."""
    tshark = sniffer.find_tshark(tshark_path)
    try:
        from pyshark import FileCapture
    except ImportError:
        raise DependencyError("the pyshark Python package is missing: install the requirements "
                              "(.venv/bin/pip install -r requirements.txt)") from None
    loop = asyncio.new_event_loop()
    try:
        capture = FileCapture(input_file=str(path), use_json=True, keep_packets=False, tshark_path=tshark,
                              eventloop=loop, custom_parameters=[a for f in sniffer.FIELDS for a in ("-e", f)])
        return loop.run_until_complete(_read(capture, frozenset(local)))
    finally:
        loop.close()


async def _read(capture, local: frozenset[str]) -> tuple[list, int]:
    parser = capture._setup_tshark_output_parser()
    records, skipped = [], 0
    try:
        process = await capture._get_tshark_process()
        data = b""
        while True:
            chunk = await process.stdout.read(sniffer.READ_BYTES)
            data += chunk
            while True:
                packet, data = parser._extract_packet_from_data(data, got_first_packet=bool(records) or skipped > 0)
                if not packet:
                    break
                try:
                    records.append(sniffer.record_from_fields(json.loads(packet)["_source"]["layers"], local))
                except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
                    skipped += 1
                    log.debug("replay sniffer: skipped a packet tshark printed: %s", exc)
            if not chunk:
                break
        await process.wait()
    finally:
        await capture.close_async()
    return records, skipped
