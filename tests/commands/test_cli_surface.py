"""What every command shows a person or a script: one sentence and a documented exit code, never a
traceback (a closed pipe, a non-root reader, a directory as --db, a missing database, a mistyped
interface); --json on every command that prints data, each one parsed here; tab completion; the
legend under `model list`; a progress line on a terminal for each model fit."""
from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from app.cli import build_parser
from tests.ops_helpers import fill_database

REPO = Path(__file__).resolve().parents[2]
LISTINGS = [["status"], ["anomalies", "list", "--since", "all"], ["blacklist", "list", "--all"], ["allow", "list"],
            ["config", "show"], ["model", "list"], ["--help"], ["fleet", "status"]]


def run(*args, stdout=subprocess.PIPE, user: str | None = None, env: dict | None = None, cwd=REPO):
    cmd = [sys.executable, "-m", "app", *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", "--regid=65534", "--clear-groups", *cmd]
    e = {**os.environ, "PORTWATCH_CONFIG": "/dev/null", "PYTHONPATH": str(REPO),     # never the machine's pins
         "PORTWATCH_PIN_ROOT": "/sys/fs/bpf/pw-surface-none", **(env or {})}
    return subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=cwd, env=e, timeout=120)


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def one_sentence(stderr: str) -> str:
    no_traceback(stderr)
    lines = [l for l in stderr.strip().splitlines() if l.startswith("portwatch: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A filled store (3 h of rounds, findings, a block, a model row) in a directory others may enter."""
    d = Path(tempfile.mkdtemp(prefix="pw-surface-", dir="/tmp"))
    d.chmod(0o755)
    db = d / "ports.db"
    fill_database(db, end=time.time() - 60)
    db.chmod(0o600)
    yield db
    shutil.rmtree(d, ignore_errors=True)


# --- a closed pipe ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args", LISTINGS, ids=lambda a: " ".join(a))
def test_a_closed_pipe_ends_quietly_with_141(store, args):
    """`status | head` and friends: the reader is gone before the first write (deterministic: the read
    end is closed at once). No traceback, no 'Exception ignored', the exit code of a SIGPIPE death."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = run("--db", str(store), *args, stdout=write_end)
    finally:
        os.close(write_end)
    no_traceback(out.stderr)
    assert out.returncode == 141, out.stderr


# --- one sentence, never a traceback ----------------------------------------------------------------

@pytest.mark.kernel                       # dropping from root to nobody needs root
@pytest.mark.parametrize("args", [["status"], ["anomalies", "list"], ["doctor"], ["top"], ["model", "list"],
                                  ["blacklist", "list"], ["report", "--out", "/tmp/pw-never"]],
                         ids=lambda a: " ".join(a))
def test_read_commands_as_non_root_say_needs_root(store, args):
    if not shutil.which("setpriv"):
        pytest.fail("setpriv (util-linux) is needed to drop root for this test")
    out = run("--db", str(store), *args, user="nobody")
    assert out.returncode == 3, (out.returncode, out.stderr)
    no_traceback(out.stderr)
    assert "needs root" in out.stderr or "run as root" in out.stdout, out.stderr


@pytest.mark.kernel
def test_a_root_only_state_directory_is_needs_root_too(tmp_path):
    """/var/lib/portwatch is 0700: another user cannot even see whether the database is there."""
    d = Path(tempfile.mkdtemp(prefix="pw-private-", dir="/tmp"))
    try:
        fill_database(d / "ports.db", end=time.time(), rounds=5)
        d.chmod(0o700)
        for args in (["status"], ["anomalies", "list"]):
            out = run("--db", str(d / "ports.db"), *args, user="nobody")
            assert out.returncode == 3 and "needs root" in one_sentence(out.stderr)
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("args", [["status"], ["anomalies", "list"], ["model", "list"], ["blacklist", "list"],
                                  ["collect", "--interface", "lo"], ["evaluate"]], ids=lambda a: " ".join(a))
def test_a_directory_as_db_is_one_sentence(tmp_path, args):
    out = run("--db", str(tmp_path), *args)
    assert out.returncode == 2 and "is a directory" in one_sentence(out.stderr)


@pytest.mark.parametrize("args", [["anomalies", "list"], ["model", "list"], ["report", "--out", "OUT"],
                                  ["cleanup"], ["anomalies", "show", "1"]], ids=lambda a: " ".join(a))
def test_a_missing_database_for_a_reader_is_one_sentence_and_not_created(tmp_path, args):
    db = tmp_path / "typo.db"
    out = run("--db", str(db), *[str(tmp_path / "out") if a == "OUT" else a for a in args])
    assert out.returncode in (2, 4) and str(db) in one_sentence(out.stderr)
    assert not db.exists()


def test_a_mistyped_interface_is_not_health(store):
    out = run("--db", str(store), "status", "--interface", "eht0")
    assert out.returncode == 2 and "interface eht0 does not exist" in one_sentence(out.stderr)


# --- machine output ------------------------------------------------------------------------------

# every command that prints data has --json; these print a sentence or run a service and have none
WITHOUT_JSON = {"run": "a service in the foreground", "down": "one sentence", "blacklist add": "one sentence",
                "blacklist remove": "one sentence", "blacklist flush": "one sentence", "allow add": "one sentence",
                "allow remove": "one sentence", "model rollback": "one sentence",
                "install-cron": "writes files (--dry-run prints them)", "fleet serve": "a service",
                "fleet node": "a service"}


def leaf_commands(parser=None, prefix=()) -> dict[str, object]:
    """'anomalies list' -> its parser, for every subcommand without subcommands of its own."""
    import argparse
    parser = parser or build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {" ".join(prefix): parser}
    out = {}
    for action in subs:
        for name, sub in action.choices.items():
            out.update(leaf_commands(sub, (*prefix, name)))
    return out


def test_every_command_that_prints_data_has_json():
    leaves = leaf_commands()
    assert set(WITHOUT_JSON) <= set(leaves), set(WITHOUT_JSON) - set(leaves)
    missing = [name for name, p in leaves.items() if name not in WITHOUT_JSON
               and "--json" not in {o for a in p._actions for o in a.option_strings}]
    assert not missing, f"commands that print data without --json: {missing}"


@pytest.mark.parametrize("args", [
    ["status"], ["anomalies", "list", "--since", "all"], ["anomalies", "show", "1"], ["blacklist", "list", "--all"],
    ["allow", "list"], ["model", "list"], ["cleanup", "--dry-run"], ["doctor"], ["config", "show"],
    ["config", "check"], ["fleet", "status"], ["report", "--out", "OUT", "--since", "all"]], ids=lambda a: " ".join(a))
def test_json_output_parses(store, tmp_path, args):
    out = run("--db", str(store), *[str(tmp_path / "report") if a == "OUT" else a for a in args], "--json")
    no_traceback(out.stderr)
    assert out.returncode in (0, 1), out.stderr             # status/doctor: unhealthy is 1, still JSON
    json.loads(out.stdout)


def test_json_of_writers_parses(tmp_path):
    """evaluate and cleanup (they write): on a copy of a small store."""
    db = tmp_path / "ports.db"
    fill_database(db, end=time.time() - 30 * 86400, rounds=5)       # a month old: cleanup deletes it
    out = run("--db", str(db), "cleanup", "--keep-days", "7", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rounds"] == 5
    out = run("--db", str(db), "evaluate", "--json", env={"PORTWATCH_REPORTS_OUT_DIR": str(tmp_path / "r")})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "no-rounds" and result["summary"].startswith("no new rounds")


def test_config_check_json_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[collector]\nround_seconds = -1\n[evaluator]\nwindow = 1\n')
    out = run("config", "check", "--json", env={"PORTWATCH_CONFIG": str(bad)})
    assert out.returncode == 2
    verdict = json.loads(out.stdout)
    assert verdict["valid"] is False and len(verdict["problems"]) == 2


def test_model_list_has_a_legend_and_json(store):
    out = run("--db", str(store), "model", "list")
    assert out.returncode == 0, out.stderr
    assert "columns: threshold = " in out.stdout and "pool = held-out windows" in out.stdout
    [model] = json.loads(run("--db", str(store), "model", "list", "--json").stdout)
    assert model["version"] == 1 and model["threshold"] == 0.05


def test_tab_completion(tmp_path):
    """argcomplete answers the shell: subcommands, then a subcommand's options."""
    answers = tmp_path / "answers"
    for line, want in (("portwatch sta", "status"), ("portwatch model list --j", "--json"),
                       ("portwatch collect --no-s", "--no-sniffer")):
        env = {"_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)),
               "_ARGCOMPLETE_STDOUT_FILENAME": str(answers)}
        out = run(env=env)
        assert out.returncode == 0, out.stderr
        assert want in answers.read_text().split(), answers.read_text()


def test_a_model_fit_shows_a_progress_line_on_a_terminal(tmp_path):
    """stderr on a pseudo-terminal: 'loading TensorFlow', then one line per epoch; stdout stays clean."""
    script = ("import numpy as np\nfrom app.services.evaluation.model import CnnLstmAutoencoder, ModelConfig\n"
              "cfg = ModelConfig(epochs=2, min_train_steps=4)\n"
              "w = np.random.default_rng(0).random((40, cfg.window, cfg.n_features)).astype('float32')\n"
              "CnnLstmAutoencoder(cfg).fit(w, w[:16], 1440.0)\nprint('fitted')\n")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=slave, cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=30) == 0 and proc.stdout.read() == b"fitted\n"
    text = seen.decode()
    assert "fitting a new model on 40 windows: loading TensorFlow" in text
    assert "fitting the model on 40 windows: epoch 1/" in text
