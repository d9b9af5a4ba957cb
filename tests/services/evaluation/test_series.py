"""Series, windows and scaling on small hand-made data (no TensorFlow)."""
from __future__ import annotations

import numpy as np
import pytest

from app.services.evaluation import series
from app.services.evaluation.scaler import LevelDeviationScaler
from app.services.evaluation.series import FEATURE_INDEX as F, PortKey


def ramp(n_ports: int, n_rounds: int) -> np.ndarray:
    """(P, T, F) where every feature of port p at round t is 100 * p + t (easy to read back)."""
    values = np.zeros((n_ports, n_rounds, series.N_FEATURES), np.float32)
    for p in range(n_ports):
        values[p] = (100 * p + np.arange(n_rounds))[:, None]
    return values


def test_build_series_fills_missing_rounds_with_zeros_and_derives_features():
    ports = [PortKey(7, 22, "tcp"), PortKey(9, 53, "udp")]
    stats = [(10, 7, 100, 10_000, 4_600, 900, 20, 4, 1),      # round 10, port 22
             (12, 7, 50, 5_000, 2_300, 400, 0, 0, 0),
             (11, 9, 8, 800, 400, 60, 0, 0, 0),
             (99, 7, 1, 1, 1, 1, 1, 1, 1)]                    # outside the rounds: ignored
    occupancy = [(10, 7, 100, "sshd", 2), (11, 7, 100, "sshd", 1), (12, 7, 200, "dropbear", 0)]
    dns = [(11, 9, 6)]
    sources = [(10, 7, 3)]
    s = series.build_series([10, 11, 12], ports, stats, occupancy, dns, sources)
    assert s.values.shape == (2, 3, series.N_FEATURES)
    ssh = s.values[0]
    assert ssh[0, F["packets"]] == 100 and ssh[0, F["bytes"]] == 10_000
    assert ssh[0, F["mean_payload"]] == pytest.approx(46.0)
    assert ssh[0, F["max_payload"]] == 900
    assert ssh[0, F["syn_share"]] == pytest.approx(0.2)
    assert ssh[0, F["syn_synack_ratio"]] == pytest.approx(20 / 5)
    assert ssh[0, F["sources"]] == 3
    assert ssh[1, F["packets"]] == 0                          # round 11: no traffic -> zeros
    assert ssh[1, F["listening"]] == 1 and ssh[1, F["established"]] == 1
    assert list(ssh[:, F["process_changed"]]) == [0, 0, 1]    # sshd -> dropbear at round 12
    dns_port = s.values[1]
    assert list(dns_port[:, F["listening"]]) == [0, 0, 0]
    assert dns_port[1, F["dns_packets"]] == 6 and dns_port[0].sum() == 0


def test_sliding_windows_shapes_stride_and_content():
    values = ramp(2, 10)
    windows, index = series.sliding_windows(values, window=4, stride=3)
    # ends aligned to the last round: t = 9, 6, 3 for each port
    assert windows.shape == (6, 4, series.N_FEATURES)
    assert sorted(index[index[:, 0] == 1, 1].tolist()) == [3, 6, 9]
    first = windows[(index[:, 0] == 1) & (index[:, 1] == 9)][0]
    assert first[:, 0].tolist() == [106, 107, 108, 109]
    none, idx = series.sliding_windows(values[:, :3], window=4)
    assert none.shape == (0, 4, series.N_FEATURES) and idx.shape == (0, 2)


def test_sliding_windows_skip_unusable_cells():
    values = ramp(1, 10)
    usable = np.ones((1, 10), bool)
    usable[0, 5] = False
    windows, index = series.sliding_windows(values, window=3, stride=1, usable=usable)
    ends = index[:, 1].tolist()
    assert ends == [2, 3, 4, 8, 9]                            # no window holds round 5
    assert all(5 not in w[:, 0] for w in windows)


def test_judge_windows_judge_each_new_round_once_with_context():
    values = ramp(2, 20)
    first_new = 9                                             # rounds 0..8 were judged before
    judge = series.judge_windows(values, window=5, first_new=first_new)
    assert judge.windows.shape == (2 * 3, 5, series.N_FEATURES)   # 11 new rounds -> 3 windows per port
    for p in range(2):
        judged_rounds = []
        for w, (port, end), mask in zip(judge.windows, judge.index, judge.judged):
            if port != p:
                continue
            rounds = series.window_rounds((port, end), 5)
            assert w[:, 0].tolist() == (100 * p + rounds).tolist()
            judged_rounds += rounds[mask].tolist()
        assert sorted(judged_rounds) == list(range(first_new, 20))   # every new round exactly once
    # the earliest window reaches back into context rounds 5..8 and judges only round 9
    earliest = judge.judged[np.argmin(judge.index[:, 1])]
    assert earliest.tolist() == [False, False, False, False, True]


def test_judge_windows_pad_short_history():
    values = ramp(1, 3)
    judge = series.judge_windows(values, window=5, first_new=0)
    assert judge.windows.shape == (1, 5, series.N_FEATURES)
    assert judge.windows[0, :, 0].tolist() == [0, 0, 0, 1, 2]  # first round repeated in front
    assert judge.judged[0].tolist() == [False, False, True, True, True]
    assert judge.index.tolist() == [[0, 2]]


def test_scaler_fits_on_training_data_only():
    rng = np.random.default_rng(0)
    train = rng.poisson(100, size=(50, 5, series.N_FEATURES)).astype(np.float32)
    test = train.copy()
    test[:, :, 0] = 1e9                                       # a wild test set
    scaler = LevelDeviationScaler().fit(train)
    before = (scaler.center_.copy(), scaler.level_scale_.copy(), scaler.dev_scale_.copy())
    scaled = scaler.transform(test)
    assert all(np.array_equal(a, b) for a, b in zip(before, (scaler.center_, scaler.level_scale_, scaler.dev_scale_)))
    levels = np.median(np.log1p(train), axis=1).reshape(-1, series.N_FEATURES)
    assert np.allclose(scaler.center_[0], np.median(levels[:, 0]))
    assert scaled.shape == (50, 5, 2 * series.N_FEATURES)
    assert (scaled[:, :, series.N_FEATURES] > 5).all()       # level far above the training range: not re-centred


def test_scaler_survives_heavy_tails_and_constant_features():
    values = np.zeros((100, 3, series.N_FEATURES), np.float32)
    values[:, :, 0] = 10.0
    values[0, 0, 0] = 1e7                                     # one huge round
    scaler = LevelDeviationScaler().fit(values)
    assert scaler.center_[0] == pytest.approx(np.log1p(10.0))
    assert (scaler.level_scale_ >= 1.0).all() and (scaler.dev_scale_ >= 0.25).all()   # no division by 0
    assert np.isfinite(scaler.transform(values)).all() and np.abs(scaler.transform(values)).max() <= 30
    with pytest.raises(RuntimeError):
        LevelDeviationScaler().transform(values)


def test_masks_and_holdout_tiles():
    s = series.Series(np.array([10, 11, 12, 13, 14]), [PortKey(1, 80, "tcp"), PortKey(2, 443, "tcp")],
                      np.zeros((2, 5, series.N_FEATURES), np.float32))
    mask = series.cell_mask(s, [(2, 11, 12), (None, 14, 14), (77, 10, 14)])
    assert mask.tolist() == [[False, False, False, False, True], [False, True, True, False, True]]
    tiles = series.holdout_tiles(3, 20, 5, 1.0, np.random.default_rng(0), start=6)
    assert sorted(tiles[tiles[:, 0] == 0, 1].tolist()) == [14, 19]   # only tiles wholly in rounds 6..19
    tmask = series.tile_mask((3, 20), tiles, 5)
    assert tmask[:, :10].sum() == 0 and tmask[:, 10:].all()


def test_level_deviation_scaler_shapes_no_leakage_and_round_trip():
    rng = np.random.default_rng(0)
    busy = rng.poisson(5000, size=(40, 6, series.N_FEATURES)).astype(np.float32)
    quiet = rng.poisson(5, size=(40, 6, series.N_FEATURES)).astype(np.float32)
    train = np.concatenate([busy, quiet])
    scaler = LevelDeviationScaler().fit(train)
    fitted = (scaler.center_.copy(), scaler.level_scale_.copy(), scaler.dev_scale_.copy())
    test = busy[:3].copy()
    test[0, 2, F["packets"]] *= 30                            # a x30 spike in one round of a busy port
    scaled = scaler.transform(test)
    assert scaled.shape == (3, 6, 2 * series.N_FEATURES) and scaled.dtype == np.float32
    assert all(np.array_equal(a, b) for a, b in zip(fitted, (scaler.center_, scaler.level_scale_, scaler.dev_scale_)))
    # the spike is many deviation units on the busy port, the level channel is constant in time
    assert scaled[0, 2, F["packets"]] > 10
    assert np.allclose(scaled[0, :, series.N_FEATURES:], scaled[0, :1, series.N_FEATURES:])
    # a quiet port's Poisson noise is not mistaken for spikes: its deviations stay small
    assert np.abs(scaler.transform(quiet)[..., F["packets"]]).max() < 5
    back = scaler.inverse_transform(scaler.transform(train))
    assert np.allclose(back, train, rtol=1e-2, atol=1e-2)
    restored = LevelDeviationScaler.from_dict(scaler.to_dict())
    assert np.array_equal(restored.transform(test), scaled)


def test_long_rounds_are_scaled_to_the_nominal_length():
    """A round covering 3x the usual time (a skipped minute) is not a 3x spike."""
    ports = [series.PortKey(1, 80, "tcp")]
    k = {1: 1, 2: 3, 3: 1}
    stats = [(r, 1, 60 * k[r], 6000 * k[r], 600 * k[r], 10, 0, 0, 0) for r in (1, 2, 3)]
    s = series.build_series([1, 2, 3], ports, stats, seconds=[60, 180, 60], nominal_seconds=60)
    f = series.FEATURE_INDEX
    assert s.values[0, :, f["packets"]].tolist() == [60, 60, 60]
    assert s.values[0, :, f["bytes"]].tolist() == [6000, 6000, 6000]
    assert s.values[0, 1, f["mean_payload"]] == 10          # ratios are not scaled


def test_series_of_a_hand_made_batch_without_sqlite():
    """The batch's views (port activity, holders, distinct sources) and its series, no database."""
    from app.services.evaluation.batch import Batch
    rounds = [{"id": i, "start_time": 60.0 * i, "end_time": 60.0 * (i + 1), "seconds": 60.0} for i in (1, 2, 3)]
    batch = Batch(rounds[1:], context=rounds[:1], ports={1: (22, "tcp"), 2: (53, "udp")}, nominal_seconds=60.0,
                  port_stats=[(1, 1, 5, 500, 0, 0, 1, 0, 0), (2, 1, 10, 1000, 0, 0, 2, 0, 0),
                              (3, 1, 12, 1200, 0, 0, 2, 0, 0), (3, 2, 40, 4000, 0, 0, 0, 0, 0)],
                  occupancy=[(2, 2, 77, "dnsd", 0, "root", "0.0.0.0")],
                  dns=[(3, 2, 6)],
                  source_ports=[(2, "198.18.0.1", 22, "tcp", 5, 0), (2, "198.18.0.2", 22, "tcp", 5, 0),
                                (3, "198.18.0.1", 22, "tcp", 12, 0), (3, "198.18.0.9", 7, "tcp", 1, 0)])
    assert series.port_activity(batch) == [(2, 53, "udp", 40, 1), (1, 22, "tcp", 22, 2)]   # batch rounds only
    assert series.held_ports(batch) == {2}
    assert sorted(series.source_counts(batch)) == [(2, 1, 2), (3, 1, 1)]                   # unknown port 7: none
    data = series.batch_series(batch, [series.PortKey(1, 22, "tcp"), series.PortKey(2, 53, "udp")])
    assert list(data.round_ids) == [1, 2, 3] and data.shape == (2, 3, series.N_FEATURES)
    f = series.FEATURE_INDEX
    assert list(data.values[0, :, f["packets"]]) == [5, 10, 12]
    assert list(data.values[0, :, f["sources"]]) == [0, 2, 1]
    assert list(data.values[1, :, f["listening"]]) == [0, 1, 0] and data.values[1, 2, f["dns_packets"]] == 6
