"""Every relative link of README.md and docs/*.md leads to a file that exists and, with a #fragment,
to a heading of that file, as GitHub renders it; every docs file is reachable from the README."""
import re
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks: a '#' comment in a bash block is no heading."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a file's headings: lowercase, punctuation but '-' and '_' dropped, spaces
    to '-', and '-1', '-2', ... after a repeated one."""
    found: set[str] = set()
    for line in prose(path.read_text()):
        if match := HEADING.match(line):
            slug = re.sub(r"[^\w\- ]", "", match[1].lower()).replace(" ", "-")
            n, anchor = 0, slug
            while anchor in found:
                n += 1
                anchor = f"{slug}-{n}"
            found.add(anchor)
    return found


def links(path: Path) -> list[str]:
    return [target for line in prose(path.read_text()) for target in LINK.findall(line)
            if not re.match(r"[a-z]+:", target)]  # http:, https:, mailto: lead elsewhere


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in links(doc):
        file, _, fragment = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif fragment and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not broken, broken


def test_each_docs_file_links_back_and_is_linked_from_the_readme():
    readme_targets = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    for doc in DOCS[1:]:
        assert doc.resolve() in readme_targets, f"README.md has no link to {doc.relative_to(ROOT)}"
        opening = doc.read_text().split("\n\n")[1]  # the line under the title
        assert "](../README.md)" in opening, f"{doc.relative_to(ROOT)} does not start with a link back"
