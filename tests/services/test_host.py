"""Host facts (app/services/host.py): resolvers and SSH peers from fakes, routes and XDP state from
fake ``ip -j`` output, and the real addresses of this namespace."""
from __future__ import annotations

import ipaddress
from collections import namedtuple

import pytest

from app.errors import UsageError
from app.services import host


def test_resolvers_and_ssh_peers(tmp_path, monkeypatch):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch lab\nnameserver 198.18.77.53\nnameserver 2001:db8::53\noptions edns0\n")
    assert host.resolvers([conf, tmp_path / "absent"]) == ["198.18.77.53", "2001:db8::53"]
    import psutil
    Addr = namedtuple("Addr", "ip port")
    Conn = namedtuple("Conn", "laddr raddr status pid")
    fake = [Conn(Addr("198.18.0.1", 22), Addr("198.18.0.50", 50000), psutil.CONN_ESTABLISHED, None),
            Conn(Addr("198.18.0.1", 2222), Addr("198.18.0.51", 50001), psutil.CONN_ESTABLISHED, 4242),
            Conn(Addr("198.18.0.1", 80), Addr("198.18.0.52", 50002), psutil.CONN_ESTABLISHED, 4343),
            Conn(Addr("198.18.0.1", 22), Addr("198.18.0.53", 50003), psutil.CONN_TIME_WAIT, None)]
    monkeypatch.setattr(psutil, "net_connections", lambda kind: fake)

    class Proc:
        def __init__(self, pid):
            self.pid = pid

        def name(self):
            return "sshd" if self.pid == 4242 else "nginx"
    monkeypatch.setattr(psutil, "Process", Proc)
    assert host.ssh_peers() == ["198.18.0.50", "198.18.0.51"]


def test_default_routes_give_gateways_and_the_interface(monkeypatch):
    routes = {"-4": [{"dst": "default", "gateway": "198.18.0.1", "dev": "pw0"}],
              "-6": [{"dst": "default", "dev": "pw1", "nexthops": [{"gateway": "2001:db8::1"}, {"dev": "pw2"}]}]}
    monkeypatch.setattr(host, "default_routes", lambda family: routes[family])
    assert host.default_gateways() == ["198.18.0.1", "2001:db8::1"]
    assert host.default_interface() == "pw0"
    routes["-4"] = []
    assert host.default_interface() == "pw1"
    monkeypatch.setattr(host, "default_routes", lambda family: None)
    assert host.default_gateways() == []
    with pytest.raises(UsageError, match="no default route"):
        host.default_interface()


def test_local_addresses_are_this_namespace_s():
    found = host.local_addresses()
    assert "127.0.0.1" in found
    canonical = host.local_address_set()
    assert "127.0.0.1" in canonical and all("%" not in a for a in canonical)
    assert all(ipaddress.ip_address(a) for a in canonical)
