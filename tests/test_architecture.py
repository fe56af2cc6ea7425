"""The package's shape: no import circle, no arrow from the attacks up into the defenses, a light command line."""

import ast
import subprocess
import sys
from pathlib import Path

import counterattack

PACKAGE = Path(counterattack.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_at_module_level(path: Path) -> set[str]:
    """The package's modules ``path`` imports when it is imported (not inside functions, not for type checking)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("counterattack"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("counterattack"):
                found.add(node.module)

    visit(tree.body)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        # A package's __init__ importing its own submodules is how it exports them: not an arrow between concerns.
        edges[name] = {m for m in imports_at_module_level(path) if m in modules and m != name
                       and not (path.name == "__init__.py" and m.startswith(name + "."))}
    return edges


def test_the_package_has_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


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
