"""The model's findings: from the windows the active model flagged, one finding per port per run of
hot rounds, with the features that stood out and the sources of the port's traffic.

Model findings' ``details`` keys (stable: reports read them): port, protocol, model_version, window,
rounds [first, last], peak_round_id, score, threshold, score_unit, hot_rounds [{round_id, error}],
features [{feature, observed, reconstructed, error, share}], packets (the port's, over the rounds).
"""
from __future__ import annotations

import numpy as np

from app.services.evaluation import finding_sources, series
from app.services.evaluation.batch import Batch
from app.services.evaluation.findings import Finding


def model_findings(batch: Batch, data: series.Series, judge: series.JudgeWindows, errors: np.ndarray,
                   recon: np.ndarray, hot: np.ndarray, threshold: float, version: int,
                   top_features: int) -> list[Finding]:
    """Model findings from flagged windows: one per port per run of hot rounds.

    errors (N, W, F) per-feature squared errors; recon (N, W, F) reconstruction in original units;
    hot (N,) bool flagged windows. A round is hot when its judged per-round error exceeds the
    threshold; hot rounds of one port at most one window apart form one finding.
    """
    window = judge.windows.shape[1]
    per_round = errors.mean(axis=2)
    by_port: dict[int, list[tuple[int, int, int]]] = {}     # port -> [(t, window i, position j)]
    for i in np.flatnonzero(hot):
        p, end = judge.index[i]
        for j in np.flatnonzero(judge.judged[i] & (per_round[i] > threshold)):
            by_port.setdefault(int(p), []).append((int(end) - window + 1 + int(j), int(i), int(j)))
    findings = []
    for p, cells in sorted(by_port.items()):
        cells.sort()
        groups: list[list[tuple[int, int, int]]] = [[cells[0]]]
        for cell in cells[1:]:
            if cell[0] - groups[-1][-1][0] <= window:
                groups[-1].append(cell)
            else:
                groups.append([cell])
        for group in groups:
            findings.append(_model_finding(batch, data, p, group, errors, recon, per_round, threshold,
                                           version, top_features, window))
    return findings


def _model_finding(batch, data, p, group, errors, recon, per_round, threshold, version, top_features, window):
    key = data.ports[p]
    first_id, last_id = int(data.round_ids[group[0][0]]), int(data.round_ids[group[-1][0]])
    t, i, j = max(group, key=lambda c: per_round[c[1], c[2]])
    score = float(per_round[i, j])
    feature_error = errors[i, j]
    order = np.argsort(feature_error)[::-1][:top_features]
    total = float(feature_error.sum()) or 1.0
    features = [{"feature": series.FEATURES[f], "observed": round(float(data.values[p, t, f]), 3),
                 "reconstructed": round(float(recon[i, j, f]), 3), "error": round(float(feature_error[f]), 4),
                 "share": round(float(feature_error[f]) / total, 3)} for f in order]
    packets, _, _ = finding_sources.port_totals(batch, key.port_id, first_id, last_id)
    sources, dominant = finding_sources.port_sources(batch, key.value, key.protocol, packets, first_id, last_id)
    details = {
        "port": key.value, "protocol": key.protocol, "model_version": version, "window": window,
        "rounds": [first_id, last_id], "peak_round_id": int(data.round_ids[t]),
        "score": round(score, 5), "threshold": round(float(threshold), 5),
        "score_unit": "mean squared error of the scaled features in the worst judged round",
        "hot_rounds": [{"round_id": int(data.round_ids[c[0]]), "error": round(float(per_round[c[1], c[2]]), 5)}
                       for c in group][:30],
        "features": features, "packets": packets,
    }
    return Finding("model", key.port_id, key.value, key.protocol, first_id, last_id, score, float(threshold),
                   source=dominant, sources=sources, details=details, covers=[(key.port_id, first_id, last_id)])
