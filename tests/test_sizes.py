"""Size rules for app/: no function longer than ~60 lines (docstring not counted), no module longer than
~400 lines, so a reader can hold one step or one module in mind; no module docstring longer than 10 lines
(what lives there and who may import it: the detail belongs on the functions or in the README). The
allow-lists name what is still over, each with a ceiling near its size when listed: it may shrink, not
grow past it; a new one may not join."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 400
MAX_MODULE_DOC_LINES = 10

# not split yet: a ceiling of the size when this list was made plus a little room (5 lines a function,
# 10 a module) for work in flight; split one and take it off the list
FUNCTIONS_OVER = {
}
MODULES_OVER = {
}
MODULE_DOCS_OVER = {
}


def sizes(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """({'path:function': lines}, {'path': lines}) for every .py file under root/app."""
    functions, modules = {}, {}
    for path in sorted((root / "app").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        text = path.read_text()
        modules[rel] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{rel}:{node.name}"
                functions[name] = max(functions.get(name, 0), node.end_lineno - node.lineno + 1 - _doc_lines(node))
    return functions, modules


def _doc_lines(node) -> int:
    """Lines of a function's (or module's) docstring: words for the reader, not steps, so not counted."""
    if not node.body:
        return 0
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def module_doc_sizes(root: Path) -> dict[str, int]:
    """{'path': lines of its module docstring, the quotes' lines included} for every .py file under
    root/app that has one."""
    return {path.relative_to(root).as_posix(): _doc_lines(ast.parse(path.read_text()))
            for path in sorted((root / "app").rglob("*.py"))}


def over(found: dict[str, int], limit: int, allowed: dict[str, int]) -> list[str]:
    return [f"{name}: {n} lines (limit {allowed.get(name, limit)})" for name, n in sorted(found.items())
            if n > allowed.get(name, limit)]


def test_no_function_above_the_limit():
    functions, _ = sizes(REPO)
    assert not over(functions, MAX_FUNCTION_LINES, FUNCTIONS_OVER)


def test_no_module_above_the_limit():
    _, modules = sizes(REPO)
    assert not over(modules, MAX_MODULE_LINES, MODULES_OVER)


def test_the_size_rules_see_a_long_function_and_a_long_module(tmp_path):
    (tmp_path / "app").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (tmp_path / "app" / "long.py").write_text(f"def step():\n{body}\n" + "\n" * 400)
    functions, modules = sizes(tmp_path)
    assert over(functions, MAX_FUNCTION_LINES, {}) == ["app/long.py:step: 71 lines (limit 60)"]
    (tmp_path / "app" / "long.py").write_text('def step():\n    """Words."""\n' + "\n".join(f"    x{i} = {i}" for i in range(59)))
    assert over(sizes(tmp_path)[0], MAX_FUNCTION_LINES, {}) == []     # 60 lines with the def, docstring aside
    assert over(modules, MAX_MODULE_LINES, {}) == ["app/long.py: 471 lines (limit 400)"]


def test_no_module_docstring_above_the_limit():
    assert not over(module_doc_sizes(REPO), MAX_MODULE_DOC_LINES, MODULE_DOCS_OVER)


def test_the_docstring_rule_sees_a_long_module_docstring(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "short.py").write_text('"""One line."""\nx = 1\n')
    (tmp_path / "app" / "empty.py").write_text("")
    (tmp_path / "app" / "long.py").write_text('"""Title.\n' + "more\n" * 9 + '"""\nx = 1\n')
    assert over(module_doc_sizes(tmp_path), MAX_MODULE_DOC_LINES, {}) == ["app/long.py: 11 lines (limit 10)"]
