"""Fixtures of the fleet tests: a real CrowdSec LAPI per test (started, stopped, its files removed)."""
from __future__ import annotations

import pytest

from tests.conftest import IN_CI
from tests.services.fleet.lapi import LocalApi, unavailable_reason
from tests.helpers import pin_root  # noqa: F401  (fixture)


@pytest.fixture
def lapi(tmp_path):
    reason = unavailable_reason()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true but the CrowdSec tests cannot run: {reason}")
        pytest.skip(reason)
    api = LocalApi(tmp_path / "crowdsec")
    try:
        yield api.start()
    finally:
        api.stop()
