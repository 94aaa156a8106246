"""The house rules of docs/architecture.md, read from the source with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "atelier"
MAX_FUNCTION_LINES = 80

# what each part may import, besides itself and the shared modules
SHARED = {"atelier.artifacts", "atelier.registry", "atelier.progress", "atelier.exports", "atelier.pretrained"}
ALLOWED = {
    "catalog": set(),
    "generator": {"catalog"},
    "indexer": {"catalog"},
    "retrieval": {"catalog", "generator", "indexer"},
    "server": {"catalog", "generator", "indexer", "retrieval"},
    "evaluation": {"catalog", "generator", "indexer", "retrieval"},
    "shared": set(),
    "top": {"catalog", "generator", "indexer", "retrieval", "server", "evaluation"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "v1" not in p.relative_to(PACKAGE).parts}


def imports_of(path: Path, name: str) -> set[str]:
    """Every atelier module `path` imports, at module level or inside functions."""
    modules = source_modules()
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from atelier import artifacts` imports a module, not the package's names
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def part_of(name: str) -> str:
    if name in SHARED:
        return "shared"
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or name in {f"atelier.{p}" for p in ALLOWED} else "top"


def graph() -> dict[str, set[str]]:
    return {name: imports_of(path, name) for name, path in source_modules().items()}


def test_imports_point_down_the_layers():
    wrong = []
    for name, targets in graph().items():
        part = part_of(name)
        for target in targets:
            other = part_of(target)
            if other not in (part, "shared") and other not in ALLOWED[part]:
                wrong.append(f"{name} ({part}) imports {target} ({other})")
    assert not wrong, "imports against the layering of docs/architecture.md:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle_among_modules():
    edges = graph()
    # a package's __init__ importing its own submodules (to register them) is not a cycle back up
    edges = {m: {t for t in ts if not (m.count(".") < t.count(".") and t.startswith(m + "."))} for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checks_see_a_cycle_and_a_wrong_arrow(tmp_path, monkeypatch):
    """The two tests above on a made-up package: they would fail if the house broke."""
    fake = tmp_path / "atelier"
    (fake / "catalog").mkdir(parents=True)
    (fake / "server").mkdir()
    for folder in (fake, fake / "catalog", fake / "server"):
        (folder / "__init__.py").write_text("")
    (fake / "catalog" / "a.py").write_text("from atelier.server import b\n")
    (fake / "server" / "b.py").write_text("def f():\n    import atelier.catalog.a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="catalog.a \\(catalog\\) imports atelier.server.b"):
        test_imports_point_down_the_layers()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycle_among_modules()


def test_no_function_over_80_lines():
    long = []
    for folder in ("atelier", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "v1" in path.relative_to(ROOT).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


def test_every_package_has_a_docstring_and_a_public_surface():
    lacking = []
    for init in sorted(PACKAGE.rglob("__init__.py")):
        if "v1" in init.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(init.read_text())
        assigned = [t for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
        names = [e for t in assigned for e in (t.elts if isinstance(t, ast.Tuple) else [t])]  # `__all__, x = ...`
        has_all = any(getattr(n, "id", "") == "__all__" for n in names)
        if not ast.get_docstring(tree) or not has_all:
            lacking.append(str(init.relative_to(ROOT)))
    assert not lacking, "packages without a docstring or __all__: " + ", ".join(lacking)


TRACKER = re.compile(r"\b(issue|ticket)s?\s*#?\s*\d+\b|\bgh-\d+\b", re.IGNORECASE)


def test_the_repository_names_no_tracker_issues():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        if Path(name).suffix not in {".py", ".md", ".toml", ".sh", ".proto", ".txt", ".cfg", ".yaml", ".yml"}:
            continue
        for number, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            if TRACKER.search(line):
                hits.append(f"{name}:{number}: {line.strip()}")
    assert not hits, "tracker issue numbers:\n" + "\n".join(hits)


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    assert ruff.exists(), "ruff is missing from this environment: it is in the test extras (pip install -e '.[test]')"
    result = subprocess.run([str(ruff), "check", "atelier", "tests", "benchmarks"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
