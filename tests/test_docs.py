"""The README and docs/*.md: every relative link and image points to a file of the repository, every
``#anchor`` to a heading of its page (GitHub's heading ids), and the README stays short."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+).*?\1")


def _prose(text: str) -> list[str]:
    """The page's lines outside fenced code blocks, with inline code spans blanked."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
            continue
        lines.append("" if fenced else CODE_SPAN.sub("", line))
    return lines


def heading_ids(text: str) -> set[str]:
    """The ids GitHub gives a page's headings: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces as ``-``, repeats numbered ``-1``, ``-2``, ..."""
    ids, seen = set(), {}
    for line in _prose(text):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))  # a link's text stays
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def broken_links(page: Path) -> list[str]:
    """``'line N: target (why)'`` for each relative link or image of ``page`` that leads nowhere."""
    text = page.read_text(encoding="utf-8")
    problems = []
    for number, line in enumerate(_prose(text), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            path, _, anchor = target.partition("#")
            where = (page.parent / path).resolve() if path else page
            if not where.exists():
                problems.append(f"line {number}: {target} (no such file)")
            elif anchor and where.suffix == ".md" and anchor not in heading_ids(where.read_text(encoding="utf-8")):
                problems.append(f"line {number}: {target} (no heading #{anchor} in {where.name})")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_leads_somewhere(page):
    assert broken_links(page) == []


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "other.md").write_text("# A page\n\n## Sampling: C -> B -> A\n\n## Notes\n## Notes\n")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n![a picture](pic.png) ![gone](missing.png) [ok](other.md#sampling-c---b---a)\n"
                    "[second notes](other.md#notes-1) [no such](other.md#nowhere) [here](#top) [web](https://x.org/y)\n"
                    "`[in code](absent.md)`\n```\n[in a fence](absent.md)\n```\n")
    assert broken_links(page) == ["line 3: missing.png (no such file)",
                                  "line 4: other.md#nowhere (no heading #nowhere in other.md)"]


def test_readme_is_short_and_every_docs_page_is_linked_from_it():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    linked = {Path(target.partition("#")[0]).name for line in _prose(readme) for target in LINK.findall(line)}
    assert {p.name for p in PAGES[1:]} <= linked
