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
    """'zerotune.training.loop' -> path, for every module of the three packages."""
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


def test_no_import_cycles():
    mods = modules()
    graph = {n: {m for m in imports(n, p, module_level_only=True) if m in mods and m != n} for n, p in mods.items()}

    def visit(node, stack, done):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph[node]):
            if not mods[nxt].name == "__init__.py" or not node.startswith(nxt + "."):  # a package's own modules
                visit(nxt, stack + [node], done)
        done.add(node)
    done: set = set()
    for n in sorted(graph):
        visit(n, [], done)


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
