"""The documentation stands alone: every relative link in README.md and docs/ resolves to a file
of this repository, and nothing points outside it (no ``../shared``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_stay_inside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    assert "../shared" not in text
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name}: {target} leaves the repository"
        assert path.exists(), f"{doc.name}: {target} does not exist"


#: a path built to the folder beside the clone (a "shared" path segment or a string into it)
SHARED_PATH = re.compile(r"""/\s*["']shared["']|["']\.\./shared""")


def test_no_test_or_source_reads_shared() -> None:
    hits = [str(p.relative_to(ROOT)) for base in ("src", "tests")
            for p in (ROOT / base).rglob("*.py")
            if p != Path(__file__).resolve() and SHARED_PATH.search(p.read_text())]
    assert hits == []
