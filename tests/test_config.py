"""app/config.py: defaults < TOML file < PORTWATCH_* environment; unknown keys and bad values are
reported by name; sources say where each value came from."""
from __future__ import annotations

from pathlib import Path

import pytest

from app import config
from app.config import ConfigError, load


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path):
    settings = load(None, environ={"PORTWATCH_CONFIG": str(write(tmp_path, ""))})
    assert settings.retention.keep_days == 14.0 and settings.alerts.smtp_port == 587
    assert all(source == "default" for *_, source in settings.items())


def test_file_then_environment_override(tmp_path):
    path = write(tmp_path, 'db = "/tmp/a.db"\n[collector]\nround_seconds = 30\n[blocklist]\nallowlist = ["10.0.0.0/8"]\n')
    env = {"PORTWATCH_COLLECTOR_ROUND_SECONDS": "5", "PORTWATCH_ALERTS_SYSLOG": "yes",
           "PORTWATCH_BLOCKLIST_ALLOWLIST": "192.0.2.0/24, 198.51.100.0/24", "PORTWATCH_STATE_DIR": "/tmp/s"}
    s = load(path, environ=env)
    assert s.general.db == "/tmp/a.db" and s.sources["general.db"] == f"file:{path}"
    assert s.collector.round_seconds == 5.0
    assert s.sources["collector.round_seconds"] == "env:PORTWATCH_COLLECTOR_ROUND_SECONDS"
    assert s.alerts.syslog is True
    assert s.blocklist.allowlist == ["192.0.2.0/24", "198.51.100.0/24"]
    assert s.general.state_dir == "/tmp/s" and s.sources["general.state_dir"] == "env:PORTWATCH_STATE_DIR"
    assert s.config_path == str(path)


@pytest.mark.parametrize("text, message", [
    ("[collector]\nrounds = \"three\"\n", "config key 'collector.rounds' must be int, got 'three'"),
    ("[collector]\nround_seconds = true\n", "config key 'collector.round_seconds' must be float"),
    ("[alerts]\nsyslog = \"yes\"\n", "config key 'alerts.syslog' must be bool"),
    ("[reports]\nout_dir = 5\n", "config key 'reports.out_dir' must be str"),
    ("[blocklist]\nallowlist = \"10.0.0.0/8\"\n", "config key 'blocklist.allowlist' must be list"),
    ("[collector]\nround_secs = 5\n", "unknown config key 'collector.round_secs'"),
    ("dbpath = \"/x\"\n", "unknown config key 'dbpath'"),
    ("[colector]\nrounds = 1\n", "unknown config section [colector]"),
    ("[collector\n", "is not valid TOML"),
])
def test_bad_file_values_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text), environ={})
    assert message in str(exc.value)


@pytest.mark.parametrize("env, message", [
    ({"PORTWATCH_COLLECTOR_ROUNDS": "x"}, "config key 'collector.rounds' must be int, got 'x'"),
    ({"PORTWATCH_ALERTS_SYSLOG": "maybe"}, "config key 'alerts.syslog' must be bool"),
    ({"PORTWATCH_RETENTION_KEEP_DAYZ": "3"}, "unknown environment setting PORTWATCH_RETENTION_KEEP_DAYZ"),
    ({"PORTWATCH_COLLECTOR_ROUND_SECONDS": "1e12"}, "config key 'collector.round_seconds' = 1000000000000.0 must be "
                                                   "above 0 and at most 86400 (env:PORTWATCH_COLLECTOR_ROUND_SECONDS)"),
    ({"PORTWATCH_BLOCKLIST_MAX_TTL_SECONDS": "1e308"}, "config key 'blocklist.max_ttl_seconds' = 1e+308 must be above "
                                                       "0 and at most 31622400"),
    ({"PORTWATCH_EVALUATOR_SEED": "99999999999999999999"}, "config key 'evaluator.seed' = 99999999999999999999 must "
                                                           "be between 0 and 4294967295"),
])
def test_bad_environment_values_are_named(tmp_path, env, message):
    env = dict(env, PORTWATCH_CONFIG=str(write(tmp_path, "")))
    with pytest.raises(ConfigError) as exc:
        load(None, environ=env)
    assert message in str(exc.value)


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "absent.toml", environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load(None, environ={"PORTWATCH_CONFIG": str(tmp_path / "absent.toml")})


def test_ops_keys_exist_with_safe_defaults():
    s = config.Settings()
    assert s.alerts.smtp_password == "" and s.alerts.smtp_starttls is True
    assert s.alerts.max_seconds > 0 and s.alerts.cooldown_seconds > 0
    assert s.metrics.textfile_dir == "" and s.metrics.file_name.endswith(".prom")
    assert s.reports.since == "7d" and s.reports.top_ports > 0
    assert s.retention.keep_days == 14.0


def test_override_records_the_command_line():
    s = config.Settings()
    s.override("retention", "keep_days", 3.0)
    s.override("retention", "keep_days", None)     # None leaves it
    assert s.retention.keep_days == 3.0 and s.sources["retention.keep_days"] == "command line"


# --- durations and ranges ------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("90", 90.0), (90, 90.0), ("15m", 900.0), ("1h", 3600.0),
                                           ("7d", 604800.0), ("1.5h", 5400.0), ("2w", 1209600.0), (" 30s ", 30.0)])
def test_one_duration_parser(text, seconds):
    from app import durations
    assert durations.seconds(text) == seconds


@pytest.mark.parametrize("text, says", [("nan", "finite"), ("inf", "finite"), ("-inf", "finite"),
                                        (float("nan"), "finite"), ("-5", "negative"), (-5, "negative"),
                                        ("0", "above 0"), ("5x", "duration like"), ("", "duration like"),
                                        (True, "duration like"), ("1e400", "finite")])
def test_duration_parser_refuses(text, says):
    from app import durations
    with pytest.raises(ValueError, match=says):
        durations.seconds(text)


def test_duration_flag_names_the_flag_and_bounds_it():
    from app import durations
    from app.errors import UsageError
    assert durations.flag("--ttl", None) is None
    assert durations.flag("--ttl", "2h", maximum=86400) == 7200
    with pytest.raises(UsageError, match=r"^--ttl must be at most 1d \(86400 s\), got '2d'$"):
        durations.flag("--ttl", "2d", maximum=86400)


def test_seconds_keys_take_durations_in_the_file_and_environment(tmp_path):
    s = load(write(tmp_path, '[blocklist]\nbase_ttl_seconds = "15m"\nmax_ttl_seconds = "7d"\n'),
             environ={"PORTWATCH_ALERTS_COOLDOWN_SECONDS": "1h"})
    assert (s.blocklist.base_ttl_seconds, s.blocklist.max_ttl_seconds, s.alerts.cooldown_seconds) == \
        (900.0, 604800.0, 3600.0)


@pytest.mark.parametrize("text, message", [
    ("[blocklist]\nbase_ttl_seconds = nan\n", "config key 'blocklist.base_ttl_seconds' must be a finite"),
    ("[blocklist]\nbase_ttl_seconds = inf\n", "config key 'blocklist.base_ttl_seconds' must be a finite"),
    ("[blocklist]\nbase_ttl_seconds = \"soon\"\n", "config key 'blocklist.base_ttl_seconds' must be a duration"),
    ("[blocklist]\nmanual_ttl_seconds = \"30d\"\n", "'blocklist.manual_ttl_seconds' = 2592000 must be at most "
                                                   "blocklist.max_ttl_seconds (604800)"),
    ("[sniffer]\nwindow_fraction = 1.5\n", "'sniffer.window_fraction' = 1.5 must be between 0 and 0.95"),
    ("[evaluator]\nwindow = 1\n", "'evaluator.window' = 1 must be between 2 and 10000"),
    ("[blocklist]\nmax_ttl_seconds = 1e308\n", "'blocklist.max_ttl_seconds' = 1e+308 must be above 0 and at most 31622400"),
    ("[collector]\nround_seconds = \"1e12\"\n", "'collector.round_seconds' = 1000000000000.0 must be above 0 and at "
                                                "most 86400"),
    ("[collector]\nrounds = 100000000000\n", "'collector.rounds' = 100000000000 must be between 0 and 1000000000"),
    ("[collector]\nreply_idle_seconds = \"2d\"\n", "'collector.reply_idle_seconds' = 172800.0 must be between 1 and 86400"),
    ("[collector]\nscanner_map_size = 0\n", "'collector.scanner_map_size' = 0 must be between 1 and 16777216"),
    ("[collector]\nconn_map_size = 16777217\n", "'collector.conn_map_size' = 16777217 must be between 1 and 16777216"),
    ("[alerts]\nwebhook_timeout = 1e9\n", "'alerts.webhook_timeout' = 1000000000.0 must be above 0 and at most 3600"),
    ("[retention]\nkeep_days = 1e300\n", "'retention.keep_days' = 1e+300 must be above 0 and at most 36600"),
    ("[crowdsec]\nresync_seconds = \"1e10\"\n", "'crowdsec.resync_seconds' = 10000000000.0 must be above 0"),
    ("[reports]\nsince = \"1e12\"\n", "'reports.since' = '1e12' must be at most"),
    ("log_level = \"LOUD\"\n", "'general.log_level' = 'LOUD' must be one of DEBUG"),
    ("[alerts]\nsyslog_facility = \"local9\"\n", "'alerts.syslog_facility' = 'local9' must be one of"),
    ("[alerts]\nwebhook_url = \"ftp://x\"\n", "must start with http:// or https://"),
    ("[blocklist]\nrule_detectors = [\"port_scna\"]\n", "names unknown detectors 'port_scna'"),
    ("[blocklist]\nallowlist = [\"198.18.0.5/24\"]\n", "'198.18.0.5/24'"),
    ("[reports]\nsince = \"yesterday\"\n", "'reports.since' = 'yesterday' must be 'all', a span"),
])
def test_values_are_checked_by_range_and_kind(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load(path, environ={})
    assert message in str(exc.value) and str(path) in str(exc.value)


def test_non_utf8_file_is_one_sentence(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"db = \"/tmp/\xff.db\"\n")
    with pytest.raises(ConfigError) as exc:
        load(path, environ={})
    assert str(exc.value) == f"config file {path} is not UTF-8 text (byte 0xff at offset 11): save it as UTF-8"


def test_group_and_run_dir_keys():
    s = load("/dev/null", environ={"PORTWATCH_GROUP": "portwatch", "PORTWATCH_RUN_DIR": "/tmp/x"})
    assert (s.general.group, s.general.run_dir) == ("portwatch", "/tmp/x")
    assert load("/dev/null", environ={}).general.run_dir == "/run/portwatch"


def test_blocklist_simulate_names_detectors_that_can_block(tmp_path):
    s = load(write(tmp_path, '[blocklist]\nsimulate = ["syn_flood", "model"]\n'), environ={})
    assert s.blocklist.simulate == ["syn_flood", "model"]
    env = {"PORTWATCH_CONFIG": str(write(tmp_path, "")), "PORTWATCH_BLOCKLIST_SIMULATE": "port_scan,syn_flood"}
    assert load(environ=env).blocklist.simulate == ["port_scan", "syn_flood"]
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, '[blocklist]\nsimulate = ["syn_flod"]\n'), environ={})
    assert "config key 'blocklist.simulate' = ['syn_flod'] names detectors that never block 'syn_flod'" in str(exc.value)


def test_map_size_defaults_have_one_home_in_common_h():
    """bpf/common.h defines each default map size once; config.py reads them from there."""
    from app.config import Collector, map_size_defaults
    sizes = map_size_defaults()
    assert sizes == {"PORT_MAP_SIZE": 65536, "SOURCE_MAP_SIZE": 65536, "SRCPORT_MAP_SIZE": 131072,
                     "FLOW_MAP_SIZE": 65536, "BLACKLIST_MAP_SIZE": 16384, "SYNLIMIT_MAP_SIZE": 1024,
                     "CONN_MAP_SIZE": 65536, "SYNACK_MAP_SIZE": 65536, "VERIFIED_MAP_SIZE": 16384,
                     "SCANNER_MAP_SIZE": 1024}
    c = Collector()
    assert (c.port_map_size, c.source_map_size, c.srcport_map_size, c.flow_map_size, c.blacklist_map_size) == (
        65536, 65536, 131072, 65536, 16384)
    assert (c.conn_map_size, c.synack_map_size, c.scanner_map_size, c.reply_idle_seconds) == (65536, 65536, 1024, 300)
    bpf = Path(__file__).resolve().parent.parent / "bpf"
    for source in ("port_flow.c", "egress.c", "parse.h"):
        assert "_MAP_SIZE " not in "".join(line for line in (bpf / source).read_text().splitlines(True)
                                           if line.startswith("#define")), source
