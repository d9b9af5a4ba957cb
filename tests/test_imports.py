"""Design rules about imports: the collector's path never loads TensorFlow, matplotlib or BCC;
services never import threads or commands; db imports nothing of portwatch but app.errors; commands
never import each other (SQL staying inside app/db/ is tests/test_no_sql_outside_db.py)."""
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
    commands = sorted(p for p in (REPO / "app" / "commands").glob("*.py") if p.stem not in ("__init__", "registry"))
    assert len(commands) > 5
    for path in commands:
        own = f"app.commands.{path.stem}"
        bad = {n for n in modules_imported(path)
               if (n.startswith("app.commands.") or n == "app.commands") and n != own
               and not (n == "app.commands.registry" or n.startswith("app.commands.registry."))}
        assert not bad, f"{path.name} imports another command: {sorted(bad)}"


def test_the_commands_rule_sees_a_violation(tmp_path):
    """The check above finds both spellings of a command importing a command."""
    sample = tmp_path / "run.py"
    sample.write_text("def run():\n    from app.commands.collect import resolve\n    from app.commands import status\n")
    assert {"app.commands.collect", "app.commands.status"} <= modules_imported(sample)


def test_tensorflow_and_matplotlib_have_one_importer_each():
    for lib, owner in (("tensorflow", "model.py"), ("matplotlib", "figures.py"), ("bcc", "xdp_loader.py")):
        users = [p.name for p in (REPO / "app").rglob("*.py") if any(n == lib or n.startswith(lib + ".")
                                                                     for n in imports_of(p))]
        assert users == [owner], (lib, users)


# The declared layer order, lowest first. A module may import its own layer and any layer below; an
# import that climbs fails. Every module of app/ must fall in exactly one layer (longest name wins).
LAYERS = (
    ("foundation", ("app", "app.errors", "app.durations", "app.permissions", "app.config", "app.config_rules",
                    "app.resources")),
    ("db", ("app.db.",)),
    ("shared leaves", ("app.services", "app.services.host", "app.services.ports", "app.services.files",
                       "app.services.locks", "app.services.progress", "app.services.text", "app.services.store_clock")),
    ("kernel", ("app.services.kernel.",)),
    ("collector/evaluation", ("app.services.collector.", "app.services.evaluation.")),
    ("blocklist", ("app.services.blocklist.",)),
    ("ops/fleet", ("app.services.ops.", "app.services.fleet.")),
    ("jobs/threads", ("app.services.jobs", "app.threads.")),
    ("commands", ("app.commands.",)),
    ("entry points", ("app.cli", "app.__main__", "app.port_collector", "app.port_detector", "app.demo", "app.lab")),
)


def layer_of(module: str) -> int | None:
    """The rank of a module in LAYERS: an entry ending in '.' names a package and everything in it
    (the package itself included); any other entry names one module exactly."""
    best, rank = -1, None
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            hit = (module == entry[:-1] or module.startswith(entry)) if entry.endswith(".") else module == entry
            if hit and len(entry) > best:
                best, rank = len(entry), i
    return rank


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the app modules it imports (anywhere in the file, function bodies included);
    ``from pkg import name`` counts as pkg.name when that is a module, else as pkg."""
    files = {module_name(p, root): p for p in (root / "app").rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == "app")
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "app":
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                edges.update(subs or {node.module})
                if len(subs) < len(node.names):
                    edges.add(node.module)
        graph[mod] = {e for e in edges if e in files and e != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops: each strongly connected group of more than one module, sorted (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def climbs(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer, and every module in no declared layer, as one line each."""
    problems = []
    for mod in sorted(graph):
        if layer_of(mod) is None:
            problems.append(f"{mod} is in no layer of LAYERS")
            continue
        for dep in sorted(graph[mod]):
            if layer_of(dep) is not None and layer_of(dep) > layer_of(mod):
                problems.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})")
    return problems


def test_no_import_cycle_among_app_modules():
    loops = cycles(import_graph(REPO))
    assert not loops, "import loops:\n" + "\n".join(" <-> ".join(c) for c in loops)


def test_no_import_climbs_the_layer_order():
    problems = climbs(import_graph(REPO))
    assert not problems, "imports that climb the layers:\n" + "\n".join(problems)


def db_imports_outside(graph: dict[str, set[str]]) -> list[str]:
    """Every import of app/db that names portwatch outside app.db and app.errors, one line each."""
    return [f"{mod} imports {dep}" for mod in sorted(graph) if mod == "app.db" or mod.startswith("app.db.")
            for dep in sorted(graph[mod]) if dep != "app.errors" and dep != "app.db" and not dep.startswith("app.db.")]


def test_db_imports_nothing_of_portwatch_but_errors():
    problems = db_imports_outside(import_graph(REPO))
    assert not problems, "app/db imports beyond app.errors:\n" + "\n".join(problems)


def write_app(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_cycle_rule_sees_a_loop(tmp_path):
    root = write_app(tmp_path, {"app/__init__.py": "", "app/services/__init__.py": "",
                                "app/services/ops/__init__.py": "",
                                "app/services/ops/alerts.py": "from app.services.ops import explain\n",
                                "app/services/ops/explain.py": "def f():\n    from app.services.ops.alerts import x\n"})
    assert cycles(import_graph(root)) == [["app.services.ops.alerts", "app.services.ops.explain"]]


def test_the_layer_rule_sees_a_climb_and_an_undeclared_module(tmp_path):
    root = write_app(tmp_path, {"app/__init__.py": "", "app/services/__init__.py": "",
                                "app/services/collector/__init__.py": "",
                                "app/services/collector/round.py": "from app.services.fleet import crowdsec\n",
                                "app/services/fleet/__init__.py": "", "app/services/fleet/crowdsec.py": "",
                                "app/services/stray.py": ""})
    assert climbs(import_graph(root)) == [
        "app.services.collector.round (collector/evaluation) imports app.services.fleet.crowdsec (ops/fleet)",
        "app.services.stray is in no layer of LAYERS"]


def test_the_db_rule_sees_an_import_of_portwatch_beyond_errors(tmp_path):
    root = write_app(tmp_path, {"app/__init__.py": "", "app/errors.py": "", "app/permissions.py": "",
                                "app/db/__init__.py": "", "app/db/rows.py": "from app.errors import DatabaseError\n",
                                "app/db/connection.py": "from app import permissions\nfrom app.db import rows\n"
                                                        "def f():\n    from app.services import host\n",
                                "app/services/__init__.py": "", "app/services/host.py": ""})
    assert db_imports_outside(import_graph(root)) == ["app.db.connection imports app.permissions",
                                                      "app.db.connection imports app.services.host"]
