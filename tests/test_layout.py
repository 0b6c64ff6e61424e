"""Where things sit: every module imports only modules below it, the benchmark lives
outside the package, and the command line answers --help without importing torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vit_mqa"
# Lowest first: a module may import only modules before it.
LAYERS = ["_version", "errors", "pretrained", "presets", "config_checks", "config", "recipe",
          "attention", "checkpoint", "images", "ink", "preprocess", "printed", "model_io",
          "model", "distill", "augment", "data", "distributed", "evaluate", "calibration",
          "explain", "tensorboard_log", "interop", "factory", "predict", "optim", "steps",
          "run_state",
          "run_setup", "training", "figures", "report", "demo", "cli_parser", "cli_commands",
          "cli", "__main__"]


def package_imports(path: Path) -> set[str]:
    """The package modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vit_mqa"):
            found.add((node.module.split(".") + [""])[1] or "__init__")
    return found


def test_every_module_imports_only_lower_layers():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS), "a module is missing from LAYERS (or LAYERS is stale)"
    for name in LAYERS:
        for dep in package_imports(PACKAGE / f"{name}.py") - {name}:
            assert dep in LAYERS and LAYERS.index(dep) < LAYERS.index(name), \
                f"{name} imports {dep}, which is not below it"


def test_the_benchmark_is_not_in_the_package():
    assert not (PACKAGE / "bench.py").exists()
    assert (PACKAGE.parents[1] / "benchmarks" / "throughput.py").is_file()


def fresh_python(code: str) -> str:
    """What `code` prints in a new interpreter (nothing imported yet), stripped."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_help_and_presets_do_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "from vit_mqa.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['predict', '--help'], ['presets']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "print('torch' in sys.modules)\n")
    assert fresh_python(code) == "False"


ROOT = PACKAGE.parents[1]


def test_every_file_and_class_reads_in_one_sitting():
    """No Python file in the package or benchmarks over 500 lines, no class over 120."""
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "benchmarks").rglob("*.py"))
    assert len(files) > 30
    for path in files:
        text = path.read_text()
        assert len(text.splitlines()) <= 500, f"{path.relative_to(ROOT)} is over 500 lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                length = node.end_lineno - node.lineno + 1
                assert length <= 120, f"{path.name}: class {node.name} is {length} lines"


def test_the_namespace_shows_only_public_names():
    code = ("import vit_mqa\n"
            "print(sorted(n for n in dir(vit_mqa) if not n.startswith('__')"
            " and n not in vit_mqa.__all__))\n")
    assert fresh_python(code) == "[]"
