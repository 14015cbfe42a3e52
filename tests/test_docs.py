"""The README pages link only to files that exist, and every result they link is valid JSON."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
# [text](target) with a relative target; web links and in-page anchors are not files
LINK = re.compile(r"\]\((?!https?://|#)([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    """The relative link targets of a markdown page, anchors stripped."""
    return [target.split("#")[0] for target in LINK.findall(page.read_text())]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    links = relative_links(page)
    assert links, f"{page.name} links no files"
    missing = [target for target in links if not (page.parent / target).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_linked_results_are_json(page: Path) -> None:
    for target in relative_links(page):
        if target.endswith(".json"):
            json.loads((page.parent / target).read_text())


def test_link_pattern_skips_web_links_and_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[a](https://x.org/y) [b](#section) [c](results/c.json#top) ![d](images/d.png)")
    assert relative_links(page) == ["results/c.json", "images/d.png"]
