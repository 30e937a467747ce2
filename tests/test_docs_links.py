"""Every relative link in the docs and the README names a file that exists, and every #anchor a heading of its page
(GitHub's heading slugs), so that moving a section or renaming a file cannot leave dead links behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "benchmarks").glob("*.md")])
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, code marks and punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for m in re.finditer(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M):
        s = slug(m.group(1))
        n = 0
        while (s if n == 0 else f"{s}-{n}") in found:  # GitHub numbers repeated headings
            n += 1
        found.add(s if n == 0 else f"{s}-{n}")
    return found


def dead_links(page: Path) -> list[str]:
    dead = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            dead.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            dead.append(f"{target}: no such heading in {file.name}")
    return dead


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_resolve(page: Path) -> None:
    assert not dead_links(page), "\n".join(dead_links(page))


def test_the_check_sees_a_dead_link(tmp_path: Path) -> None:
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title\n\n### 3-, 5- and 6-bit `grids`\n\n## Title\n")
    page.write_text("[ok](b.md#3--5--and-6-bit-grids) [ok](b.md#title-1) [ok](#here)\n\n## Here\n\n"
                    "[x](b.md#nothing) [y](c.md) [z](#there)\n```\n[in code](#not-checked)\n```\n")
    assert dead_links(page) == ["b.md#nothing: no such heading in b.md", "c.md: no such file",
                                "#there: no such heading in a.md"]
