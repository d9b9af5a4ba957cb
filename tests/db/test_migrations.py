"""Migrations and init.sql agree: a database made at every older schema version and migrated by
connect() equals a fresh init.sql database object by object — every table (columns with type,
NOT NULL, default and key; foreign keys), index (columns, unique, partial), view and trigger."""
from __future__ import annotations

import re
import sqlite3

import pytest

from app.db import migrations
from app.db.connection import MIGRATIONS, SCHEMA_VERSION, connect
from tests.db.test_connection import V1_SQL, v1_database


def _sql_text(sql: str | None) -> str:
    """A view's or trigger's SQL with whitespace, comments and IF NOT EXISTS normalised away."""
    sql = re.sub(r"--[^\n]*", " ", sql or "")
    sql = re.sub(r"\bIF NOT EXISTS\b", " ", sql, flags=re.I)
    return " ".join(sql.split()).replace("( ", "(").replace(" )", ")")


def schema(conn: sqlite3.Connection) -> dict:
    """{(type, name): description} of every schema object but SQLite's own (sqlite_%). Columns are
    compared by name (ALTER TABLE appends where init.sql may place a column in the middle)."""
    out = {}
    for kind, name, table, sql in conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name"):
        if kind == "table":
            columns = {r[1]: (r[2].upper(), r[3], r[4], r[5]) for r in conn.execute(f"PRAGMA table_xinfo({name})")}
            fks = sorted(tuple(r[2:5]) for r in conn.execute(f"PRAGMA foreign_key_list({name})"))
            without_rowid = bool(re.search(r"WITHOUT\s+ROWID", sql or "", re.I))
            out[(kind, name)] = (columns, fks, without_rowid)
        elif kind == "index":
            info = next(r for r in conn.execute(f"PRAGMA index_list({table})") if r[1] == name)
            cols = [r[2] for r in conn.execute(f"PRAGMA index_info({name})")]
            out[(kind, name)] = (table, cols, info[2], info[4], _sql_text(sql))
        else:                                   # view, trigger
            out[(kind, name)] = (table, _sql_text(sql))
    return out


def database_at(path, version: int) -> None:
    """A database made at schema ``version``: the first init.sql, then the migrations up to it."""
    v1_database(path, with_blocklist=True)
    conn = sqlite3.connect(path)
    for number in sorted(n for n in MIGRATIONS if n <= version):
        conn.executescript(MIGRATIONS[number])
        conn.execute(f"PRAGMA user_version = {number}")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("version", [1] + sorted(n for n in MIGRATIONS if n < SCHEMA_VERSION))
def test_a_database_migrated_from_an_older_version_equals_a_fresh_one(tmp_path, version):
    database_at(tmp_path / "old.db", version)
    old, fresh = connect(tmp_path / "old.db"), connect(tmp_path / "fresh.db")
    try:
        assert old.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        got, want = schema(old), schema(fresh)
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key] == want[key], key
    finally:
        old.close()
        fresh.close()


def test_the_comparison_sees_a_missing_column_and_a_changed_view(tmp_path):
    a, b = sqlite3.connect(tmp_path / "a.db"), sqlite3.connect(tmp_path / "b.db")
    a.executescript("CREATE TABLE t (x INTEGER NOT NULL, y TEXT); CREATE VIEW v AS SELECT x FROM t;")
    b.executescript("CREATE TABLE t (x INTEGER NOT NULL); CREATE VIEW v AS SELECT x + 1 FROM t;")
    assert schema(a)[("table", "t")] != schema(b)[("table", "t")]
    assert schema(a)[("view", "v")] != schema(b)[("view", "v")]


def test_migration_files_are_numbered_once(tmp_path):
    (tmp_path / "011_a.sql").write_text("SELECT 1;")
    (tmp_path / "011_b.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match="two schema migrations numbered 11"):
        migrations.load(tmp_path)
    assert V1_SQL and min(MIGRATIONS) == 2
