"""The README and docs/*.md link only to files that exist, and to headings that exist.

Relative links and images are resolved against the file that holds them; an `#anchor` is
checked against the target's headings, slugged as GitHub does. Links inside code are not
links. Fast: it reads a handful of markdown files and nothing else.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target), target optionally in <...> and followed by a title.
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(\S+)")
HTML_TARGET = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.IGNORECASE)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked unless
    ``blank_code`` is false (headings keep their code text in the anchor)."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)[0] * len(m.group(1))
            continue
        if fence is not None:
            if line.strip().startswith(fence) and set(line.strip()) <= {fence[0]}:
                fence = None
            continue
        if blank_code:
            line = CODE_SPAN.sub(lambda s: " " * len(s.group()), line)
        lines.append((number, line))
    return lines


def links(text: str) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(text):
        found += [(number, m.group(1).strip("<>")) for m in INLINE_LINK.finditer(line)]
        found += [(number, m.group(1)) for m in REFERENCE_DEF.finditer(line)]
        found += [(number, m.group(1)) for m in HTML_TARGET.finditer(line)]
    return found


def github_slug(heading: str) -> str:
    """GitHub's heading anchor (github-slugger): the rendered text lower-cased, characters
    other than letters, digits, marks, spaces, hyphens and underscores dropped, and each
    space turned into a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "")
    text = re.sub(r"(\*{1,3}|_{1,3})(\S(?:.*?\S)?)\1", r"\2", text)  # emphasis markers
    kept = "".join(c for c in text.strip().lower()
                   if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 ... for repeats."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8"), blank_code=False):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        result.add(slug)
    return result


def broken_links(doc: Path, root: Path = REPO) -> list[str]:
    problems = []
    text = doc.read_text(encoding="utf-8")
    for number, target in links(text):
        if EXTERNAL.match(target):
            continue
        where = f"{doc.relative_to(root)}:{number}: {target}"
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if path_part.startswith("/"):
            problems.append(f"{where}: absolute path (breaks outside the repository)")
            continue
        file = (doc.parent / path_part).resolve() if path_part else doc
        if not file.is_relative_to(root.resolve()):
            problems.append(f"{where}: points outside the repository")
        elif not file.exists():
            problems.append(f"{where}: no such file")
        elif anchor and file.suffix == ".md" and unquote(anchor) not in anchors(file):
            problems.append(f"{where}: no heading with this anchor in {file.name}")
    return problems


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    assert not broken_links(doc), "\n".join(broken_links(doc))


def test_the_documents_link_to_each_other():
    readme = {target for _, target in links((REPO / "README.md").read_text(encoding="utf-8"))}
    assert {"docs/benchmarks.md", "docs/interop.md", "docs/distributed.md"} <= {
        t.partition("#")[0] for t in readme}
    assert any(t.endswith(".png") for t in readme), "the README shows no figure"


def test_github_slugs():
    assert github_slug("Throughput: `vit-mqa bench`") == "throughput-vit-mqa-bench"
    assert github_slug("Time to accuracy (MNIST, Fashion-MNIST)") == (
        "time-to-accuracy-mnist-fashion-mnist")
    assert github_slug("Ablation: `mnist-3min`, one change at a time") == (
        "ablation-mnist-3min-one-change-at-a-time")
    assert github_slug("What's *new* in 1.0?") == "whats-new-in-10"
    assert github_slug("snake_case  and [a link](x.md)") == "snake_case--and-a-link"


def test_the_checker_catches_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Same\n\n## Same\n\n## Run `x --y`\n")
    (tmp_path / "img.png").write_bytes(b"")
    doc = tmp_path / "README.md"
    doc.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#same-1) ![ok](img.png) [ok](#top) [web](https://x.y)\n"
        "[ok](docs/a.md#run-x---y)\n"
        "# Top\n"
        "`[code](missing.md)`\n```\n[code](missing.md)\n```\n"
        "[gone](docs/b.md) ![gone](missing.png) [bad anchor](docs/a.md#nope)\n"
        "[up](../outside.md) [abs](/etc/passwd)\n[ref]: docs/c.md\n")
    problems = broken_links(doc, root=tmp_path)
    targets = [p.split(": ")[1] for p in problems]
    assert targets == ["docs/b.md", "missing.png", "docs/a.md#nope", "../outside.md",
                       "/etc/passwd", "docs/c.md"], problems


def test_architecture_page_names_every_module_and_only_those():
    page = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    from tests.test_layout import ordered_modules

    in_order = re.findall(r"^\| `([a-z_.]+)` \|", page, re.M)
    assert in_order == ordered_modules()  # every module, in the import order
