"""Design rules about imports: the collector's path never loads TensorFlow, matplotlib or BCC;
services never import threads or commands; db imports no service; commands never import each other
(SQL staying inside app/db/ is tests/test_no_sql_outside_db.py)."""
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_collector_import_closure_has_no_tensorflow_matplotlib_or_bcc():
    code = ("import sys; import app.port_collector; from app.cli import build_parser; build_parser(); "
            "import app.threads.collection, app.services.collector.collector, app.commands.collect; "
            "heavy = [m for m in ('tensorflow', 'keras', 'matplotlib', 'bcc', 'sklearn') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_imports_point_one_way():
    for path in (REPO / "app" / "services").rglob("*.py"):
        bad = {n for n in imports_of(path) if n.startswith(("app.threads", "app.commands", "app.cli", "app.port_"))}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
    for path in (REPO / "app" / "db").rglob("*.py"):
        bad = {n for n in imports_of(path) if n.startswith(("app.threads", "app.services", "app.commands"))}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def modules_imported(path: Path) -> set[str]:
    """Every module an import statement names, ``from app.commands import x`` counted as app.commands.x."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_commands_import_services_never_other_commands():
    commands = sorted((REPO / "app" / "commands").glob("*.py"))
    assert len(commands) > 5
    for path in commands:
        own = f"app.commands.{path.stem}"
        bad = {n for n in modules_imported(path)
               if (n.startswith("app.commands.") or n == "app.commands") and n != own}
        assert not bad, f"{path.name} imports another command: {sorted(bad)}"


def test_the_commands_rule_sees_a_violation(tmp_path):
    """The check above finds both spellings of a command importing a command."""
    sample = tmp_path / "run.py"
    sample.write_text("def run():\n    from app.commands.collect import resolve\n    from app.commands import status\n")
    assert {"app.commands.collect", "app.commands.status"} <= modules_imported(sample)


def test_tensorflow_and_matplotlib_have_one_importer_each():
    for lib, owner in (("tensorflow", "model.py"), ("matplotlib", "figures.py"), ("bcc", "xdp.py")):
        users = [p.name for p in (REPO / "app").rglob("*.py") if any(n == lib or n.startswith(lib + ".")
                                                                     for n in imports_of(p))]
        assert users == [owner], (lib, users)
