"""The suite passes on a machine with only what ``pip install -e ".[test]"`` installs: every test that
needs an optional package (transformers, TRL, peft, tensorboard, ...) says so with
``@pytest.mark.requires(...)`` and is skipped with the reason when the package is missing (conftest.py).

Checked here by reading the code: a test needs a package when it, or a function of tests/ or
benchmarks/ that it calls (followed through the names each module defines or imports), imports it."""
from __future__ import annotations

import ast

from conftest import OPTIONAL_PACKAGES, REPO

SOURCES = sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py"))


def _optional_imports(node: ast.AST) -> set[str]:
    found = set()
    for sub in ast.walk(node):
        names = [a.name for a in sub.names] if isinstance(sub, ast.Import) else \
            [sub.module] if isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0 else []
        found |= {n.split(".")[0] for n in names} & OPTIONAL_PACKAGES.keys()
    return found


def _called_names(node: ast.AST) -> set[str]:
    """Plain names and ``module.name`` of the calls in ``node``."""
    return {ast.unparse(sub.func) for sub in ast.walk(node) if isinstance(sub, ast.Call)
            and isinstance(sub.func, (ast.Name, ast.Attribute))}


def _declared(fn: ast.FunctionDef, module_marks: set[str]) -> set[str]:
    declared = set(module_marks)
    for dec in fn.decorator_list:
        if isinstance(dec, ast.Call) and ast.unparse(dec.func) == "pytest.mark.requires":
            declared |= {a.value for a in dec.args if isinstance(a, ast.Constant)}
    return declared


class Modules:
    """tests/ and benchmarks/ modules: each function's optional imports, and the calls it makes
    resolved to functions of these modules (its own module's, or ones it imports by name)."""

    def __init__(self):
        self.trees = {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in SOURCES}
        self.memo: dict[tuple[str, str], set[str]] = {}

    def _functions(self, module: str) -> dict[str, ast.FunctionDef]:
        return {n.name: n for n in self.trees[module].body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def _scope(self, module: str) -> dict[str, tuple[str, str]]:
        scope = {name: (module, name) for name in self._functions(module)}
        for node in self.trees[module].body:
            if isinstance(node, ast.ImportFrom) and node.module in self.trees:
                scope.update({a.asname or a.name: (node.module, a.name) for a in node.names})
            elif isinstance(node, ast.Import):
                for a in (a for a in node.names if a.name in self.trees):
                    scope.update({f"{a.asname or a.name}.{fn}": (a.name, fn)
                                  for fn in self._functions(a.name)})
        return scope

    def needs(self, module: str, fn: ast.FunctionDef) -> set[str]:
        key = (module, fn.name)
        if key not in self.memo:
            self.memo[key] = found = _optional_imports(fn)
            scope = self._scope(module)
            for target_module, target in (scope[name] for name in _called_names(fn) if name in scope):
                target_fn = self._functions(target_module).get(target)
                if target_fn is not None:
                    found |= self.needs(target_module, target_fn)
        return self.memo[key]


def test_no_test_module_imports_an_optional_package_at_import_time():
    offenders = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and _optional_imports(node):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"import the optional package inside the test or helper instead: {offenders}"


def test_every_test_needing_an_optional_package_declares_it():
    modules = Modules()
    undeclared = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_marks = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark"
                                                    for t in node.targets):
                module_marks |= {c.value for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                missing = modules.needs(path.stem, node) - _declared(node, module_marks)
                if missing:
                    undeclared.append(f"{path.name}::{node.name} needs {sorted(missing)}")
    assert not undeclared, "add @pytest.mark.requires(...): " + "; ".join(undeclared)


def test_the_checker_sees_an_undeclared_import(tmp_path):
    fn = ast.parse("def test_x():\n    import peft\n").body[0]
    assert _optional_imports(fn) == {"peft"} and _declared(fn, set()) == set()
    marked = ast.parse("@pytest.mark.requires('peft')\ndef test_x():\n    import peft\n").body[0]
    assert _declared(marked, set()) == {"peft"}
