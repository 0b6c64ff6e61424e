"""Where things sit: the package is a few sub-packages by concern, each importing only the
tiers below it; inside a package, modules import only those listed before them. The
benchmarks live outside the package, the command line answers --help without importing
torch, and predicting loads only what predicting needs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vit_mqa"
ROOT = PACKAGE.parents[1]
# Lowest first. A module may import any module of a lower tier, and those listed before
# it in its own tier. Root modules are tiers of one (helpers below, entry points on top).
TIERS: list[tuple[str, list[str]]] = [
    ("", ["_version", "errors", "device", "checkpoint"]),
    ("config", ["presets", "checks", "sections", "recipe"]),
    ("data", ["images", "ink", "preprocess", "printed", "augment", "datasets", "outliers"]),
    ("models", ["attention", "builtin", "hub", "vit", "adapt", "factory", "interop"]),
    ("evaluation", ["evaluate", "predict", "calibration", "explain"]),
    ("training", ["log", "distributed", "tensorboard_log", "distill", "optim", "steps",
                  "state", "setup", "loop"]),
    ("apps", ["figures", "report", "demo", "cli_parser", "cli_commands", "cli"]),
    ("", ["__init__", "__main__"]),
]
MAX_MODULES_PER_FOLDER = 12
# The package's modules that `vit-mqa predict` may load, packages' __init__ not counted.
MAX_PREDICT_MODULES = 17


def ordered_modules() -> list[str]:
    """Every module's dotted name inside the package (config.recipe, errors), lowest first."""
    return [f"{package}.{name}" if package else name for package, names in TIERS
            for name in names]


def module_path(name: str) -> Path:
    return PACKAGE.joinpath(*name.split(".")).with_suffix(".py")


def package_imports(name: str) -> set[str]:
    """The package modules that module ``name`` imports, at the top or inside functions, as
    dotted names inside the package ("models.vit"); a package itself is its "__init__"."""
    here = name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(module_path(name).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = here[:len(here) - (node.level - 1)] if node.level > 1 else list(here)
            parts = base + (node.module.split(".") if node.module else [])
            targets = [parts + [alias.name] for alias in node.names] if not node.module else [parts]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vit_mqa"):
            targets = [node.module.split(".")[1:]]
        else:
            continue
        for parts in targets:
            dotted = ".".join(parts)
            if module_path(dotted).is_file():
                found.add(dotted)
            elif (PACKAGE.joinpath(*parts) / "__init__.py").is_file():
                found.add(f"{dotted}.__init__" if parts else "__init__")
    return found


def test_every_module_is_in_a_tier_and_imports_only_below_it():
    order = ordered_modules()
    found = {str(p.relative_to(PACKAGE).with_suffix("")).replace("/", ".")
             for p in PACKAGE.rglob("*.py")}
    packages = {package for package, _ in TIERS if package}
    found -= {f"{package}.__init__" for package in packages}
    assert found == set(order), ("modules missing from TIERS", sorted(found - set(order)),
                                 "stale entries", sorted(set(order) - found))
    rank = {name: i for i, name in enumerate(order)}
    tier_of = {f"{p}.{n}" if p else n: t for t, (p, names) in enumerate(TIERS) for n in names}
    for name in order:
        for dep in package_imports(name) - {name}:
            if dep.endswith("__init__") and dep != "__init__":
                continue  # a package's docstring-only __init__
            assert dep in rank, f"{name} imports {dep}, which is not in TIERS"
            same_tier = tier_of[dep] == tier_of[name]
            assert tier_of[dep] < tier_of[name] or (same_tier and rank[dep] < rank[name]), \
                f"{name} imports {dep}, which is not below it"


def test_no_folder_holds_more_than_twelve_modules():
    for folder in [PACKAGE, *(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())]:
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= MAX_MODULES_PER_FOLDER, \
            f"{folder.relative_to(ROOT)} holds {len(modules)} modules"


def test_package_inits_hold_only_a_docstring():
    """Sub-packages import nothing: loading one module never drags in its neighbours."""
    for init in PACKAGE.glob("*/__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0], ast.Expr), init


def test_the_benchmark_is_not_in_the_package():
    assert (ROOT / "benchmarks" / "throughput.py").is_file()
    assert not list(PACKAGE.rglob("*bench*.py"))


def fresh_python(code: str) -> str:
    """What `code` prints in a new interpreter (nothing imported yet), stripped."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_help_and_presets_do_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "from vit_mqa.apps.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['predict', '--help'], ['presets']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "print('torch' in sys.modules)\n")
    assert fresh_python(code) == "False"


def test_predicting_loads_only_what_predicting_needs():
    digit = ROOT / "examples" / "digits" / "marker-3.png"
    code = ("import sys, contextlib, io\n"
            "from vit_mqa.apps.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            f"    code = main(['predict', 'vit-mqa/mnist', {str(digit)!r}])\n"
            "assert code == 0 and out.getvalue().split(': ')[1].startswith('3 '), out.getvalue()\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('vit_mqa.')"
            " and not m.endswith('__init__'))))\n")
    loaded = fresh_python(code).split()
    modules = [m for m in loaded if module_path(m.removeprefix("vit_mqa.")).is_file()]
    assert len(modules) <= MAX_PREDICT_MODULES, (len(modules), modules)
    for unwanted in ("data.datasets", "config.presets", "config.recipe", "training.distributed",
                     "evaluation.evaluate", "data.augment"):
        assert f"vit_mqa.{unwanted}" not in loaded


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


def test_every_public_name_resolves_and_train_stays_the_function():
    code = ("import vit_mqa, inspect\n"
            "values = [getattr(vit_mqa, n) for n in vit_mqa.__all__]\n"
            "import vit_mqa.training.loop\n"
            "print(inspect.isfunction(vit_mqa.train))\n")
    assert fresh_python(code) == "True"
