"""No SQL outside app/db/: a string constant in app/ that starts with an SQL statement keyword, or a
call of ``.execute``/``.executemany``/``.executescript``, lives under app/db/ or nowhere."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "app"
# statement keywords as the SQL here is written (upper case), at the start of a string
# (followed by more text: a lone "DELETE" is an HTTP method, not a statement)
SQL = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|PRAGMA|WITH|VACUUM|BEGIN|ATTACH)\s+\S")
EXECUTE = {"execute", "executemany", "executescript"}


def sql_in(source: str) -> list[tuple[int, str]]:
    """(line, text) of every SQL-looking string constant (f-strings by their leading text) and every
    call of an execute method, in one module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):   # an f-string's literal parts are Constant nodes too
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.match(node.value):
            found.append((node.lineno, node.value.strip()[:60]))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in EXECUTE:
            found.append((node.lineno, f".{node.func.attr}(...)"))
    return sorted(found)


def test_no_sql_statement_outside_app_db():
    outside = [p for p in APP.rglob("*.py") if (APP / "db") not in p.parents]
    assert len(outside) > 20
    hits = [f"{p.relative_to(REPO)}:{line}: {text}" for p in outside for line, text in sql_in(p.read_text())]
    assert not hits, "SQL outside app/db/:\n" + "\n".join(hits)


def test_the_scan_finds_sql_and_leaves_prose_alone():
    source = '''
conn.execute("SELECT id FROM rounds")
rows = f"""  INSERT INTO ports (value) VALUES ({1})"""
cur.executemany(query, rows)
QUERY = "PRAGMA user_version"
"""Delete rounds older than D days; select the interface with --interface."""
message = "Update the config, then create the table"
'''
    assert [line for line, _ in sql_in(source)] == [2, 2, 3, 4, 5]
    assert (APP / "db") in next((APP / "db").glob("*.py")).parents
    assert any(sql_in(p.read_text()) for p in (APP / "db").glob("*.py"))   # the scan does see app/db's SQL
