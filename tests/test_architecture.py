"""The shape of the code: imports run one way (launcher -> training -> core), core is torch-free,
no import cycles, the CLI starts without torch, files and functions stay small enough to read."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"core": "zerotune.core", "training": "zerotune.training", "launcher": "zerotune.launcher"}
HEAVY = ("torch", "deepspeed", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "numpy")
MAX_FILE_LINES = 350
MAX_FUNCTION_LINES = 60
# Longer functions, each with its reason.
LONG_FUNCTIONS: dict[str, str] = {}


def modules() -> dict[str, Path]:
    """'zerotune.training.run.loop' -> path, for every module of the three packages."""
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def imports(name: str, path: Path, module_level_only: bool) -> set[str]:
    """Absolute names of the zerotune modules and top-level packages `path` imports."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # `if TYPE_CHECKING:` blocks do not run
        nodes = [n for n in nodes if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from . import checkpoint`
    return found


def test_training_and_core_never_import_the_launcher():
    for name, path in modules().items():
        if name.startswith("zerotune.launcher"):
            continue
        bad = [m for m in imports(name, path, module_level_only=False) if m.startswith("zerotune.launcher")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: training/ and core/ never import launcher/"


def test_core_imports_only_core_and_no_heavy_package():
    for name, path in modules().items():
        if not name.startswith("zerotune.core"):
            continue
        for m in imports(name, path, module_level_only=False):
            assert not m.startswith(("zerotune.training", "zerotune.launcher")), f"{path}: core imports {m}"
        heavy = [m for m in imports(name, path, module_level_only=True) if m.split(".")[0] in HEAVY]
        assert not heavy, f"{path.relative_to(ROOT)} imports {heavy} at module level: core is torch-free"


def find_cycle(graph: dict[str, set[str]], mods: dict[str, Path]) -> list[str] | None:
    """An import cycle in `graph` (module -> modules it imports), or None."""
    def visit(node, stack, done):
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph[node]):
            if not mods[nxt].name == "__init__.py" or not node.startswith(nxt + "."):  # a package's own modules
                cycle = visit(nxt, stack + [node], done)
                if cycle:
                    return cycle
        done.add(node)
        return None
    done: set = set()
    for n in sorted(graph):
        cycle = visit(n, [], done)
        if cycle:
            return cycle
    return None


def import_graph(mods: dict[str, Path], module_level_only: bool) -> dict[str, set[str]]:
    return {n: {m for m in imports(n, p, module_level_only) if m in mods and m != n} for n, p in mods.items()}


def test_no_import_cycles_at_any_level():
    """Imports inside functions count too: a circle through a function-level import is still a
    circle a reader has to untangle (and an import-order trap the day it moves to the top)."""
    mods = modules()
    for level in (True, False):
        cycle = find_cycle(import_graph(mods, module_level_only=level), mods)
        assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The rooms of training/ and what each may import (besides core and itself). run/ is the top.
ROOMS = ("run", "checkpoint", "export", "monitoring", "model", "long_context", "data")
MAY_IMPORT = {
    "data": set(),
    "model": {"data"},
    "long_context": {"model", "data"},
    "checkpoint": set(),
    "export": {"checkpoint", "model", "data"},
    "monitoring": set(),
    "run": set(ROOMS),
}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["zerotune", "training"] and parts[2] in ROOMS else None


def direction_errors(mods: dict[str, Path]) -> list[str]:
    errors = []
    for name, path in mods.items():
        room = room_of(name)
        if room is None:
            continue
        for m in sorted(imports(name, path, module_level_only=False)):
            target = room_of(m)
            if target and target != room and target not in MAY_IMPORT[room]:
                errors.append(f"{path.relative_to(ROOT)} imports {m}: {room}/ may import "
                              f"{', '.join(sorted(MAY_IMPORT[room])) or 'only core'}")
    return errors


def test_rooms_import_one_way():
    assert set(MAY_IMPORT) == set(ROOMS)
    assert sorted(p.name for p in (ROOT / "training").iterdir() if p.suffix == ".py") == ["__init__.py", "__main__.py"]
    assert {p.name for p in (ROOT / "training").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ROOMS)
    errors = direction_errors(modules())
    assert not errors, "\n".join(errors)


def test_the_checks_catch_what_they_forbid(tmp_path, monkeypatch):
    """A planted circle through function-level imports and a planted import against the
    direction are both found (so the two tests above can fail)."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from zerotune.training.checkpoint import b\n")
    b.write_text("import os\n\ndef g():\n    from zerotune.training.checkpoint import a\n")
    mods = {"zerotune.training.checkpoint.a": a, "zerotune.training.checkpoint.b": b}
    assert find_cycle(import_graph(mods, module_level_only=True), mods) is None
    assert find_cycle(import_graph(mods, module_level_only=False), mods) == [
        "zerotune.training.checkpoint.a", "zerotune.training.checkpoint.b", "zerotune.training.checkpoint.a"]
    c = tmp_path / "c.py"
    c.write_text("def h():\n    from zerotune.training.run.loop import train\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert direction_errors({"zerotune.training.checkpoint.c": c}) == [
        "c.py imports zerotune.training.run.loop: checkpoint/ may import only core",
        "c.py imports zerotune.training.run.loop.train: checkpoint/ may import only core"]


def test_cli_starts_without_torch():
    code = ("import sys, zerotune.launcher.cli as c; c.build_parser(); "
            f"bad = [m for m in {HEAVY[:4]!r} if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for folder in (*PACKAGES, "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            lines = path.read_text().splitlines()
            if len(lines) > MAX_FILE_LINES:
                long_files.append(f"{rel} ({len(lines)} lines)")
            for node in ast.walk(ast.parse("\n".join(lines))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_FUNCTIONS:
                        long_functions.append(f"{rel}:{node.name} ({n} lines)")
    assert not long_files, f"files over {MAX_FILE_LINES} lines: {long_files}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_room_init_files_import_nothing():
    """docs/architecture.md: a room's __init__.py imports nothing, so importing one module of a room
    never drags in the others (callers import the module they need)."""
    bad = []
    for path in sorted((ROOT / "training").rglob("__init__.py")):
        tree = ast.parse(path.read_text())
        found = [ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                 and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
        if found:
            bad.append(f"{path.relative_to(ROOT)}: {found}")
    assert not bad, f"__init__ files that import: {bad}"
