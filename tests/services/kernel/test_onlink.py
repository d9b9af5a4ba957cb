"""The on-link test of an interface (app/services/kernel/onlink.py) against a real veth in a lab:
its attached prefixes and its neighbour table say on-link, a routed address does not."""
from __future__ import annotations

import subprocess

import pytest

from app.services.kernel import onlink

pytestmark = pytest.mark.kernel


def test_attached_prefixes_and_neighbours_are_on_link_routed_addresses_are_not(lab):
    routed, neighbour = f"198.19.{lab.subnet}.77", f"198.19.{lab.subnet}.78"
    subprocess.run(["ip", "neigh", "replace", neighbour, "lladdr", "02:00:00:00:00:78", "dev", lab.interface,
                    "nud", "permanent"], check=True, capture_output=True)
    test = onlink.read(lab.interface)
    assert lab.host_v4(1) in test and lab.host_v6(1) in test and f"198.18.{lab.subnet}.250" in test
    assert neighbour in test                     # a neighbour entry outside the prefixes (proxy ARP, a /32 peer)
    assert routed not in test and "198.18.255.1" not in test and "2001:db8:ffff::1" not in test
    assert f"::ffff:{lab.host_v4(1)}" not in test      # an IPv6 source is never the IPv4 host
    assert onlink.read("pwnosuchif0") is None
