"""The SYN-limit service's input checks and the config keys that govern it (no kernel; the exact
drops through real XDP are tests/threads/test_counting.py)."""
from __future__ import annotations

import pytest

from app import config
from app.errors import UsageError
from app.services.kernel import synlimit


def test_bad_ports_protocols_and_budgets_are_one_sentence(tmp_path):
    with pytest.raises(UsageError, match=r"^port 0 is out of range \(1-65535\)$"):
        synlimit.set_limit(tmp_path, 0, 10, 60)
    with pytest.raises(UsageError, match=r"^a SYN limit applies to tcp only, not 'udp'$"):
        synlimit.clear_limit(tmp_path, 53, "udp")
    with pytest.raises(UsageError, match="0 or more per second"):
        synlimit.set_limit(tmp_path, 80, -1, 60)


def test_syn_limit_is_off_by_default_and_checked_at_load(tmp_path):
    (tmp_path / "c.toml").write_text("")
    s = config.load(tmp_path / "c.toml", environ={})
    assert (s.blocklist.syn_limit_enabled, s.blocklist.syn_limit_per_second) == (False, 100)
    (tmp_path / "bad.toml").write_text("[blocklist]\nsyn_limit_per_second = 0\n")
    with pytest.raises(config.ConfigError, match="syn_limit_per_second"):
        config.load(tmp_path / "bad.toml", environ={})
