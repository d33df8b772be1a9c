"""Every file, link and test that the docs name exists in the repository (the docs must stand alone)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "examples" / "README.md", *(ROOT / "docs").glob("*.md")])
PAGES += sorted((ROOT / "integrations").glob("**/README.md")) + [ROOT / "tests" / "fidelity" / "README.md"]

_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_CODE_PATH = re.compile(r"`((?:src|examples|tests|docs|benchmarks|comfyui|integrations)/[\w./-]+)`")
_TEST_NAME = re.compile(r"\b(test_[a-z0-9_]+)")
#: Notes outside the repository that docs once cited; a reader cannot open them.
_OUTSIDE_NOTES = ("DI_STAR_MATH.md", "PERFORMANCE.md", "ARCHITECTURE.md", "ENVIRONMENT.md", "STYLE.md")


def _defined_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("*.py"):
        names.add(path.stem)
        names.update(re.findall(r"^\s*def (test_[a-z0-9_]+)", path.read_text(), flags=re.M))
    return names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_path_a_page_names_exists(page):
    text = page.read_text()
    missing = []
    for target in _LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (page.parent / target).exists():
            missing.append(target)
    for target in _CODE_PATH.findall(text):
        target = target.rstrip(".")
        if "*" not in target and not (ROOT / target).exists():
            missing.append(target)
    assert not missing, f"{page.relative_to(ROOT)} names files that are not in the repository: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_cites_notes_outside_the_repository(page):
    text = page.read_text()
    assert not [note for note in _OUTSIDE_NOTES if note in text]


def test_every_test_a_page_cites_exists():
    defined = _defined_tests()
    cited = {name for page in PAGES for name in _TEST_NAME.findall(page.read_text())}
    # A cited prefix such as `test_*_steps_move_*` is a pattern, written with `*`; keep only whole names.
    missing = sorted(name for name in cited if name not in defined and not name.endswith("_"))
    assert not missing, f"docs cite tests that do not exist: {missing}"


def test_no_source_docstring_cites_notes_outside_the_repository():
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("src", "tests", "examples", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "test_docs.py" and any(note in path.read_text() for note in _OUTSIDE_NOTES)
    ]
    assert not offenders, f"cite design notes that are not in the repository: {offenders}"
