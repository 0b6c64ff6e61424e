"""What a user installs: the wheel holds the package and nothing else, the sdist holds what
the README links to, and the version lives in one place."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import vit_mqa

REPO = Path(__file__).resolve().parents[1]
# Markdown links and images whose target is a relative path: [text](path) or ![alt](path).
RELATIVE_LINK = re.compile(r"!?\[[^\]]*\]\((?!https?://|mailto:|#)([^)\s#]+)")


def _build(kind: str, tmp_path: Path) -> Path:
    """Build a wheel or sdist from a copy of the tree (the repo's own build/ and egg-info
    stay untouched) with setuptools' PEP 517 backend, as pip would."""
    src = tmp_path / "src-tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".venv", "runs", "build",
                                    ".git", ".pytest_cache", ".ruff_cache")
    shutil.copytree(REPO, src, ignore=ignore)
    out = tmp_path / "dist"
    code = (f"from setuptools import build_meta as b; "
            f"print(b.build_{kind}({str(out)!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build("wheel", tmp_path_factory.mktemp("wheel"))


def test_wheel_holds_the_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"vit_mqa-{vit_mqa.__version__}.dist-info/"
    assert wheel.name.startswith(f"vit_mqa-{vit_mqa.__version__}-py3-none-any")
    assert all(n.startswith(("vit_mqa/", dist_info)) for n in names), sorted(
        n for n in names if not n.startswith(("vit_mqa/", dist_info)))
    assert "vit_mqa/py.typed" in names and "vit_mqa/models/vit.py" in names
    assert "vit_mqa/assets/printed-letters.npz" in names
    shipped = re.compile(r"vit_mqa/pretrained/[a-z-]+/(config|card)\.json")
    assert not any("/results/" in n or n.endswith((".json", ".jsonl", ".ipynb", ".png"))
                   for n in names if not shipped.fullmatch(n))
    metadata = zipfile.ZipFile(wheel).read(dist_info + "METADATA").decode()
    assert f"\nVersion: {vit_mqa.__version__}\n" in metadata
    assert "Classifier: Typing :: Typed" in metadata


def test_wheel_carries_the_built_in_models_and_the_printed_digits(wheel):
    import hashlib
    import json

    from vit_mqa.models.builtin import BUILTIN_MODELS, PREFIX

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "vit_mqa/assets/printed-digits.npz" in names
        for name in BUILTIN_MODELS:
            folder = f"vit_mqa/pretrained/{name.removeprefix(PREFIX)}/"
            assert {folder + f for f in ("config.json", "card.json", "model.safetensors")} <= names
            card = json.loads(z.read(folder + "card.json"))
            weights = z.read(folder + "model.safetensors")
            assert hashlib.sha256(weights).hexdigest() == card["sha256"]


def test_sdist_ships_every_file_the_readme_links_to(tmp_path):
    sdist = _build("sdist", tmp_path)
    with tarfile.open(sdist) as tar:
        prefix = tar.getnames()[0].split("/")[0]
        files = [n[len(prefix) + 1:] for n in tar.getnames()]
    # A link may name a folder: every parent of a shipped file is shipped too.
    shipped = set(files) | {str(parent) for f in files for parent in Path(f).parents}
    links = set(RELATIVE_LINK.findall((REPO / "README.md").read_text()))
    assert links, "the README links to nothing relative: the check would be empty"
    missing = sorted(link for link in links
                     if str(Path(link.removeprefix("./")).as_posix()).rstrip("/") not in shipped)
    assert not missing, f"README links to files the sdist does not ship: {missing}"
