"""The package's shape: no import cycles, every module importable on its own and setting no environment variable
as it is, and a command line that does not import torch until a command runs (so `fastlm --help` is instant)."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_modules() -> dict[str, Path]:
    """Every module of the installed package by name; kernels/ is installed as fastlm.kernels."""
    modules = {}
    for folder, package in ((ROOT / "fastlm", "fastlm"), (ROOT / "kernels", "fastlm.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = package_modules()


def imported_modules(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (at import time or inside a function:
    a cycle through a lazy import is still a cycle)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import: from the package, up level - 1 folders
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in MODULES)
    found.discard(name)
    return found


def find_cycle(graph: dict[str, set[str]]):
    """One cycle of the graph as a list of names (first == last), or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_module_graph_has_no_cycle():
    graph = {name: imported_modules(name, path) for name, path in MODULES.items()}
    # A package imports what its __init__ re-exports; its modules importing each other through the package
    # name is not a cycle of code, so a module's dependency on its own package is left out.
    for name in graph:
        graph[name] = {dep for dep in graph[name] if not name.startswith(dep + ".")}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


# Run in a fresh interpreter: it loads torch (as every module does), then forks one child per module that
# imports that module first of all. A child shares nothing of fastlm with its siblings, so each module's own
# import order is exercised, at a fraction of the cost of a fresh interpreter per module.
IMPORT_EACH = """
import json, os, sys, traceback
import torch
results = {}
for name in sys.argv[1:]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            __import__(name)
            message = ""
        except BaseException:
            message = traceback.format_exc(limit=-3)
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        results[name] = pipe.read()
    os.waitpid(pid, 0)
print(json.dumps(results))
"""
IMPORTABLE = sorted(name for name in MODULES if name != "fastlm.__main__")  # __main__ runs the command line


@pytest.fixture(scope="module")
def import_failures() -> dict[str, str]:
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH, *IMPORTABLE], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", IMPORTABLE)
def test_every_module_imports_on_its_own(name, import_failures):
    assert import_failures[name] == "", f"importing {name} first failed:\n{import_failures[name]}"


def test_imports_between_test_files_go_through_support_modules():
    """A test file shares code only through support modules (helpers.py, tolerances.py, example_corpus.py, ...),
    never by importing another test file; and every parity test takes its bound from tests/tolerances.py."""
    parity = {"test_cells_parity", "test_cells_transfer", "test_triton_kernels", "test_triton_persistent",
              "test_losses", "test_cpu_loss_kernel", "test_onnx_export", "test_fast_step"}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
        assert not [name for name in imported if name.startswith("tests.test_")], f"{path.name} imports a test file"
        assert path.stem not in parity or "tests.tolerances" in imported, f"{path.name}: its bound is not tolerances'"


def test_no_import_sets_an_environment_variable():
    """Importing every module changes nothing in the process's environment: what a setting chooses is chosen
    where it is used (TRITON_INTERPRET where the triton backend is built, fastlm.cells.triton). Run without
    TRITON_INTERPRET, which this test session sets for itself (conftest.py)."""
    code = ("import os, sys, torch\nbefore = dict(os.environ)\nfor name in sys.argv[1:]:\n    __import__(name)\n"
            "print(sorted(k for k in {*before, *os.environ} if before.get(k) != os.environ.get(k)))")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code, *IMPORTABLE], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["profile", "--help"], ["bench", "--help"],
                                  ["generate", "--help"]])
def test_help_does_not_import_torch(argv):
    code = ("import sys\nfrom fastlm.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "usage:" in done.stdout and done.stderr.strip().endswith("torch not imported"), done.stderr


def test_every_package_folder_is_installed():
    """pyproject.toml lists the packages a (non-editable) install copies: a new folder must be named there."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(("fastlm", *init.parent.relative_to(ROOT / "fastlm").parts))
               for init in (ROOT / "fastlm").rglob("__init__.py")} | {"fastlm.kernels"}
    assert listed == folders
