"""The README stays a front page, and no relative link in it or in docs/ leads nowhere.

`make docs` (mkdocs build --strict) checks the links between the site's pages and their anchors; these tests
also cover README.md, which is outside the site, and links that leave docs/ (the study plots, configs).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(markdown: str) -> list[str]:
    """Targets of the markdown links and images outside code, without URLs, pure #anchors or fragments."""
    prose = CODE_SPAN.sub("", FENCE.sub("", markdown))
    targets = (match.group(1) for match in LINK.finditer(prose))
    return [target.split("#", 1)[0] for target in targets
            if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_leads_to_a_file(page):
    source = ROOT / page
    broken = [target for target in relative_links(source.read_text()) if not (source.parent / target).exists()]
    assert not broken, f"{page} links to missing files: {broken}"


def test_the_link_finder_sees_links_and_skips_code():
    markdown = ("See [a](docs/a.md#x), ![plot](../p.png \"t\"), [web](https://e.org), [here](#y).\n"
                "`[not](code.md)`\n```\n[nor](fenced.md)\n```\n")
    assert relative_links(markdown) == ["docs/a.md", "../p.png"]
