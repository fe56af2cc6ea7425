"""The package's shape: no import circle, no arrow from the attacks up into the defenses, a light command line."""

import ast
import subprocess
import sys
from pathlib import Path

import counterattack

PACKAGE = Path(counterattack.__file__).resolve().parent


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package_root: Path = PACKAGE) -> set[str]:
    """The package's modules ``path`` imports, at module level or inside functions (a deferred import is an arrow
    all the same); imports for type checking only are not."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path, package_root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    checking_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                     and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in checking_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("counterattack"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("counterattack"):
            found.add(node.module)
    return found


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # A package's __init__ importing its own submodules is how it exports them: not an arrow between concerns.
        edges[name] = {m for m in imports_of(path, package) if m in modules and m != name
                       and not (path.name == "__init__.py" and m.startswith(name + "."))}
    return edges


def a_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph, as the modules along it, or None."""
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in state and (found := visit(nxt, [*trail, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_the_package_has_no_import_circle():
    circle = a_circle(graph())
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_a_circle_through_a_function_level_import_is_seen(tmp_path):
    """The check itself: two modules of a copy of the package that import each other, one inside a function."""
    import shutil

    copy = tmp_path / "counterattack"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "stats.py").write_text((copy / "stats.py").read_text() + "\n\ndef _late():\n    from .report import "
                                   "format_table\n\n    return format_table\n")
    edges = graph(copy)
    seen: set[str] = set()

    def back_to_stats(node: str) -> bool:
        seen.add(node)
        return any(nxt == "counterattack.stats" or (nxt not in seen and back_to_stats(nxt)) for nxt in edges[node])

    assert "counterattack.report" in edges["counterattack.stats"] and back_to_stats("counterattack.stats")
    assert a_circle(edges) is not None


def test_the_attacks_do_not_import_the_defenses():
    for name, targets in graph().items():
        if name.startswith("counterattack.attacks"):
            assert not any(t.startswith("counterattack.defenses") for t in targets), (name, targets)


def test_the_command_line_parses_without_importing_torch(tmp_path):
    """The first parse after a change of the code reads the registries (and caches their options); later ones
    import no model library (a process of its own: the test process has long imported torch)."""
    code = ("import sys; from counterattack.cli import build_parser; "
            "build_parser().parse_args(['eval', '--eps', '2']); "
            "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))")
    env = {**__import__("os").environ, "COUNTERATTACK_CACHE": str(tmp_path)}
    heavy = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        heavy.append(done.stdout.strip())
    assert heavy == ["['open_clip', 'torch', 'torchvision']", "[]"]


def test_no_module_outgrows_one_reading():
    # A module past this size had started holding two concepts (context.py and records.py both did once).
    longest = max(PACKAGE.rglob("*.py"), key=lambda path: len(path.read_text(encoding="utf-8").splitlines()))
    assert len(longest.read_text(encoding="utf-8").splitlines()) <= 450, longest
