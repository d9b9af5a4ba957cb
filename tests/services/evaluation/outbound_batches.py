"""Hand-made batches for the outbound and DNS detectors (pure functions: no database)."""
from __future__ import annotations

from app.services.evaluation.batch import Batch

T0 = 1_000_000.0            # end of round 0; round i covers (T0 + 60 (i-1), T0 + 60 i]


def round_row(i: int, seconds: float = 60.0) -> dict:
    return {"id": i, "start_time": T0 + 60.0 * (i - 1), "end_time": T0 + 60.0 * i, "seconds": seconds,
            "scanner_status": "ok"}


def batch(n: int = 10, first: int = 1, **rows) -> Batch:
    """n batch rounds first..first+n-1 of 60 s; ``rows`` are Batch fields (ports, occupancy, ...)."""
    b = Batch(rounds=[round_row(i) for i in range(first, first + n)], nominal_seconds=60.0)
    for name, value in rows.items():
        setattr(b, name, value)
    return b


def flow(round_id, dst, dst_port, src_port, protocol="tcp", packets=1, nbytes=60, first_seen=None,
         last_seen=None, flags=0x02) -> tuple:
    """An outbound_flows row: (round_id, dst_address, dst_port, protocol, src_port, packets, bytes,
    first_seen, last_seen, tcp_flags)."""
    seen = first_seen if first_seen is not None else T0 + 60.0 * (round_id - 1) + 1.0
    return (round_id, dst, dst_port, protocol, src_port, packets, nbytes, seen,
            last_seen if last_seen is not None else seen, flags)
