"""The round's verified peers from the XDP program's ``verified`` map (no kernel): decoded through the
same mirrors as the collector, only proofs that grew this round, with their fingerprints."""
from __future__ import annotations

import ctypes

from app.services.collector import egress_rounds, rounds
from app.services.kernel.bpf_structs import PwVerifiedValue, addr_bytes


def verified(entries) -> rounds.MapReading:
    """A reading of the verified map: entries (address, proofs, proof number, ttl, mac bytes)."""
    keys, values = b"", b""
    for address, proofs, proof, ttl, mac in entries:
        keys += addr_bytes(address)
        v = PwVerifiedValue(last_ns=1, proofs=proofs, proof=proof, ttl=ttl)
        ctypes.memmove(v.mac, mac, 6)
        values += bytes(v)
    size = ctypes.sizeof(PwVerifiedValue)
    return rounds.decode("verified", keys, values, len(entries), len(addr_bytes("::1")), size, 1)


def test_verified_peers_are_the_proofs_that_grew_with_their_fingerprint():
    before = verified([("198.18.0.2", 1, 1, 64, b"\x02\x00\x00\x00\x00\x02"),
                       ("2001:db8::3", 4, 3, 63, b"\x0a\x0b\x0c\x0d\x0e\x0f")])
    now = verified([("198.18.0.2", 1, 1, 64, b"\x02\x00\x00\x00\x00\x02"),          # nothing new
                    ("2001:db8::3", 5, 2, 61, b"\x0a\x0b\x0c\x0d\x0e\x0f"),          # one more proof
                    ("::ffff:198.18.0.4", 1, 3, 255, b"\xfe\xdc\xba\x98\x76\x54")])  # new: an IPv6 address
    assert egress_rounds.verified_peers(rounds.diff(now, before)) == {
        "2001:db8::3": ("opened-tcp", 61, "0a:0b:0c:0d:0e:0f"),
        "::ffff:198.18.0.4": ("opened-udp", 255, "fe:dc:ba:98:76:54")}
    assert egress_rounds.verified_peers(rounds.diff(now, now)) == {}
    assert egress_rounds.verified_peers(rounds.diff(now, rounds.empty("verified")))["198.18.0.2"] == (
        "handshake", 64, "02:00:00:00:00:02")
