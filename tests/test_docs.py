"""The README and ``docs/``: every relative link resolves, the README stays a five-minute read,
and the HTTP reference names every field of the service's request and answer schemas.

Reads the Markdown files and imports the schemas: no process, no server. A link is
``[text](target)`` outside code; ``target`` is a file relative to the page (optionally with
``#anchor``) or ``#anchor`` alone, and an anchor must be the slug of a heading in the page it
points into (GitHub's rule: lower case, punctuation dropped, spaces to hyphens, ``-1``, ``-2`` ...
for repeats).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 200
# pages another part of the project writes: a link to one is checked once the page is present
PROVIDED_ELSEWHERE = {"docs/clearml-server.md"}

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
LINK = re.compile(r"\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:


def prose(text: str) -> str:
    """The Markdown without fenced code blocks and code spans (links there are not links)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without markup, lower case, punctuation dropped."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor the page's headings make, repeats numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links(page: Path) -> list[str]:
    """The link targets of a page that point inside the repository."""
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8"))) if not EXTERNAL.match(t)]


def broken(page: Path, target: str) -> str | None:
    """Why ``target`` (a link on ``page``) does not resolve, or None when it does."""
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        if dest.is_relative_to(ROOT) and dest.relative_to(ROOT).as_posix() in PROVIDED_ELSEWHERE:
            return None
        return f"{target}: no such file"
    if path and not dest.is_relative_to(ROOT):
        return f"{target}: outside the repository"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: no heading with anchor #{anchor} in {dest.name}"
    return None


def test_the_pages_exist() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    for name in ("README.md", "docs/README.md", "docs/training.md", "docs/clearml.md", "docs/export.md",
                 "docs/service.md", "docs/explorer.md", "docs/results.md", "bench/README.md"):
        assert name in names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page: Path) -> None:
    problems = [why for target in relative_links(page) if (why := broken(page, target))]
    assert not problems, f"{page.relative_to(ROOT)}: " + "; ".join(problems)


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_names_a_local_path(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"(?<![\w.])/(?:home|root|tmp|work|Users)/", text), page


def table_names(page: Path, heading: str) -> set[str]:
    """The backticked names in the first column of the table under ``heading`` (``a``, ``b`` in
    a cell written as ``a``, ``b``)."""
    text = page.read_text(encoding="utf-8")
    section = text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([a-z_]+)`", row.split(" | ")[0])}


def test_the_http_reference_names_every_request_and_answer_field() -> None:
    from stepwise.serve.service import TranslateBatchRequest, TranslateRequest, TranslationResult

    service = ROOT / "docs" / "service.md"
    request = set(TranslateRequest.model_fields) | set(TranslateBatchRequest.model_fields)
    assert table_names(service, "## Request fields") == request
    assert table_names(service, "## The answer") == set(TranslationResult.model_fields)


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# A title: `code`, here\n\n[ok](#a-title-code-here) [bad](#nowhere) [gone](missing.md)\n"
                    "`[not a link](nope.md)`\n\n```\n[nor](this.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["#a-title-code-here", "#nowhere", "missing.md"]
    assert anchors(page) == {"a-title-code-here"}
    assert broken(page, "#a-title-code-here") is None
    assert broken(page, "#nowhere") is not None
