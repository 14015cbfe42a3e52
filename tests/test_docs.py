"""The README pages link only to files that exist, and every result they link is valid JSON."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]
# [text](target) or a reference definition "[label]: target", with a relative target; web links
# and in-page anchors are not files
LINK = re.compile(r"\]\((?!https?://|#)([^)\s]+)\)|^\[[^\]]+\]:[ \t]+(?!https?://|#)(\S+)", re.M)
REFERENCE_USE = re.compile(r"\]\[([^\]]+)\]")
REFERENCE_DEFINITION = re.compile(r"^\[([^\]]+)\]:", re.M)


def relative_links(page: Path) -> list[str]:
    """The relative link targets of a markdown page, anchors stripped."""
    return [(inline or defined).split("#")[0] for inline, defined in LINK.findall(page.read_text())]


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


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_reference_link_is_defined(page: Path) -> None:
    text = page.read_text()
    undefined = set(REFERENCE_USE.findall(text)) - set(REFERENCE_DEFINITION.findall(text))
    assert not undefined, f"{page.relative_to(ROOT)} uses undefined reference links: {undefined}"


def test_link_pattern_skips_web_links_and_anchors(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("[a](https://x.org/y) [b](#section) [c](results/c.json#top) ![d](images/d.png)\n"
                    "[e][r]\n\n[r]: results/e.json#top\n[w]: https://x.org/z\n[h]: #here\n")
    assert relative_links(page) == ["results/c.json", "images/d.png", "results/e.json"]
