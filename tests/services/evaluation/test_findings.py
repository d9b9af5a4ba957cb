"""The findings contract: exact round trip through the anomalies.reasons text."""
import json

import pytest

from app.services.evaluation.findings import ONE_WAY, TWO_WAY, Finding, Source


def _finding():
    return Finding("port_scan", None, None, None, 3, 7, 40.0, 25.0, source="198.18.5.9",
                   sources=[Source("198.18.5.9", packets=120, bytes=7200, syn=120, evidence=ONE_WAY, forged=True),
                            Source("2001:db8::5", packets=4, share=0.25, evidence=TWO_WAY)],
                   details={"rule": ">= 25 ports", "ports": {"tcp": [1, 2, 3]}}, covers=[(None, 3, 7), (11, 3, 7)],
                   source_count=2)


def test_round_trip_is_exact():
    f = _finding()
    back = Finding.from_json(f.to_json(), detector="port_scan", port_id=None, port=None, protocol=None,
                             first_round_id=3, last_round_id=7, score=40.0, threshold=25.0)
    assert back == f


def test_stored_text_is_readable_with_json_paths():
    data = json.loads(_finding().to_json())
    assert data["sources"][0]["address"] == "198.18.5.9"
    assert data["sources"][0]["evidence"] == "one-way"
    assert data["forged_sources"] == ["198.18.5.9"]
    assert data["ports"] == {"tcp": [1, 2, 3]}


def test_details_cannot_shadow_contract_keys():
    with pytest.raises(ValueError):
        Finding("model", 1, 80, "tcp", 1, 1, 1.0, 0.5, details={"sources": []})


def test_addresses_put_main_source_first():
    f = Finding("syn_flood", 1, 80, "tcp", 1, 2, 900.0, 500.0, source="198.18.1.1",
                sources=[Source("198.18.1.2"), Source("198.18.1.1")])
    assert f.addresses == ["198.18.1.2", "198.18.1.1"]          # the sources list order is kept
    assert f.port_label == "tcp/80"
