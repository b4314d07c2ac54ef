"""The repository is self-contained and its documents are true to the files they point at.

- every relative link in every Markdown file resolves (file, and `#anchor` as GitHub slugs it);
- nothing in the repository points outside it (`../shared`, which a fresh clone does not have);
- every `dist_tempnet...` module path and `configs/...` file named in the README exists.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _tracked_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True
    )
    return [REPO / line for line in out.stdout.splitlines() if (REPO / line).is_file()]


def _markdown_files() -> list[Path]:
    return sorted(p for p in _tracked_files() if p.suffix == ".md")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return LINK.findall(text)


@pytest.mark.parametrize("doc", _markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc: Path):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z]+:", target):  # http(s):, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor})")
        elif REPO not in dest.parents and dest != REPO:
            broken.append(f"{target} (outside the repository)")
    assert not broken, f"{doc.relative_to(REPO)}: " + "; ".join(broken)


def test_nothing_points_outside_the_repository():
    offenders = []
    for path in _tracked_files():
        if path.suffix in {".png", ".jpg", ".tar", ".pt", ".whl"} or path.name == Path(__file__).name:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if "../shared" in text:
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, f"files that point at ../shared (not in a fresh clone): {offenders}"


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent is a module, not a package
        return False


def test_readme_names_only_modules_and_configs_that_exist():
    readme = (REPO / "README.md").read_text()
    modules = set(re.findall(r"\b(dist_tempnet(?:\.[a-z_]+)+)\b", readme))
    missing = []
    for name in sorted(modules):
        # `dist_tempnet.x.y.attr`: the longest prefix that is a module must exist.
        parts = name.split(".")
        if not any(_is_module(".".join(parts[:i])) for i in range(len(parts), 1, -1)):
            missing.append(name)
    configs = set(re.findall(r"\bconfigs/[\w.\-]+\.yaml\b", readme))
    missing += [c for c in sorted(configs) if not (REPO / c).is_file()]
    assert not missing, f"README names what does not exist: {missing}"


def test_the_link_checker_finds_a_broken_link(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("# Title\n\nsee [a](missing.md) and [b](#title) and [c](#nope)\n")
    assert _links(doc) == ["missing.md", "#title", "#nope"]
    assert _anchors(doc) == {"title"}
