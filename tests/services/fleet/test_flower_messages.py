"""What crosses the wire from a host, at the message level (the link itself is TLS): the portwatch
ClientApp's train and evaluate replies for a host whose store holds known addresses, ports and process
names carry only arrays of the network's weight shapes and the documented numeric counts; the
serialized replies (Flower's own protobuf, what the SuperNode sends) contain none of those strings.
"""
from __future__ import annotations

import sqlite3
import time

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict  # noqa: E402

from tests.services.fleet.test_flower import SMALL  # noqa: E402
from tests.services.evaluation.synthetic import SyntheticStore  # noqa: E402

# the documented metric keys of each reply (client_app.py's docstring): counts and rates, nothing else
TRAIN_KEYS = {"num-windows"}
EVALUATE_KEYS = {"num-windows", "version", "held-out-rate-per-day", "budget-per-day", "adopted", "refusal",
                 "active-version", "error-ratio"}
PORTS = {(2222, "tcp"): (40, "pwsecretd"), (8443, "tcp"): (700, "pwwebfront"), (5353, "udp"): (90, "pwmdns")}


def store_strings(db: str) -> set[str]:
    """Every address, port number and process name the host's store holds (what must not leave it)."""
    conn = sqlite3.connect(db)
    try:
        addresses = {r[0] for r in conn.execute("SELECT DISTINCT address FROM source_stats")}
        ports = {str(r[0]) for r in conn.execute("SELECT DISTINCT value FROM ports WHERE value >= 0")}
    finally:
        conn.close()
    assert len(addresses) >= 3 and {"2222", "8443", "5353"} <= ports
    return addresses | ports | {proc for _, proc in PORTS.values()}


def serialized(msg: Message) -> bytes:
    from flwr.common.serde import message_to_proto
    return message_to_proto(msg).SerializeToString()


def test_replies_carry_weights_and_counts_only(tmp_path):
    from app.services.fleet import learning
    from app.services.fleet.flower_app.portwatch_fleet.client_app import app
    (tmp_path / "config.toml").write_text(SMALL)
    db = str(tmp_path / "ports.db")
    store = SyntheticStore(db, seed=5, ports=PORTS)
    store.add_rounds(60)
    store.close()
    secrets = store_strings(db)
    shape = {"window": 15, "lstm-units": 8, "bottleneck": 4, "seed": 0}
    initial = learning.initial_weights(shape)
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"db": db, "config": str(tmp_path / "config.toml"),
                                   "state-dir": str(tmp_path / "state")})
    replies = {}
    for kind in ("train", "evaluate"):
        config = ConfigRecord({"rounds": 1, "server-round": 1, **shape})
        # the instruction as the SuperLink delivers it (metadata set there: the internal constructor)
        meta = Metadata(run_id=1, message_id=f"m-{kind}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind)
        msg = Message(content=RecordDict({"arrays": ArrayRecord(initial), "config": config}), metadata=meta)
        replies[kind] = app(msg, context)
    for kind, reply in replies.items():
        content = reply.content
        assert not content.config_records, f"{kind}: a config record leaves the host"
        assert set(content.metric_records) == {"metrics"}
        metrics = dict(content.metric_records["metrics"])
        assert set(metrics) == (TRAIN_KEYS if kind == "train" else EVALUATE_KEYS)
        assert all(type(v) in (int, float) for v in metrics.values()), metrics
        if kind == "train":
            assert set(content.array_records) == {"arrays"}
            sent = content.array_records["arrays"].to_numpy_ndarrays()
            assert [a.shape for a in sent] == [w.shape for w in initial]      # the network's shapes, nothing more
            assert all(a.dtype == np.float32 for a in sent)
            assert metrics["num-windows"] > 0 and any((a != w).any() for a, w in zip(sent, initial))
        else:
            assert not content.array_records                                   # the fleet weights stay here
            assert metrics["version"] > 0 and metrics["num-windows"] > 0
        wire = serialized(reply)
        leaked = sorted(s for s in secrets if s.encode() in wire)
        # a port number's digits could occur inside float32 bytes only by chance; strings never
        assert not [s for s in leaked if not s.isdigit()], f"{kind}: {leaked} in the serialized reply"
        assert not leaked or all(not _as_text(wire, s) for s in leaked), f"{kind}: {leaked} as text"


def _as_text(wire: bytes, digits: str) -> bool:
    """Whether ``digits`` appear in ``wire`` as a text token (not inside a run of other digits or letters)."""
    import re
    return bool(re.search(rb"(?<![0-9A-Za-z.])" + digits.encode() + rb"(?![0-9A-Za-z])", wire))
