"""bench/README.md indexes every recorded result: one row per file or folder under bench/*/results/, with
the command that made it and the doc sections that cite it, and each of those sections does cite it. Every
relative link in the README, docs/ and the index leads to a file that exists, and to a heading in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INDEX = REPO / "bench" / "README.md"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), INDEX]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def sections(path: Path) -> dict[str, str]:
    """Each heading's anchor and its section's text, up to the next heading of the same or a higher level
    (the page's title: the whole page). Lines in fenced code are never headings."""
    lines, fenced, starts = path.read_text().splitlines(), False, []
    for number, line in enumerate(lines):
        fenced = fenced != line.startswith("```")
        if not fenced and (match := re.match(r"(#{1,6}) (.+)", line)):
            starts.append((number, len(match[1]), slug(match[2])))
    found: dict[str, str] = {}
    for i, (number, level, anchor) in enumerate(starts):
        end = next((n for n, lvl, _ in starts[i + 1 :] if lvl <= level), len(lines))
        repeat = sum(1 for _, _, a in starts[:i] if a == anchor)  # GitHub numbers a repeated heading
        found[anchor if not repeat else f"{anchor}-{repeat}"] = "\n".join(lines[number:end])
    return found


def index_rows() -> dict[str, list[str]]:
    """The index's rows: each record's path from the repository root, and the doc links of its last column."""
    rows = {}
    records = INDEX.read_text().split("\n## Records\n", 1)[1]
    for line in records.splitlines():
        if line.startswith("| ["):
            record, *_, cited = (cell.strip() for cell in line.strip("|").split(" | "))
            link = LINK.search(record)
            assert link, f"{line}: the first column links the record"
            path = (INDEX.parent / link[1]).resolve().relative_to(REPO)
            assert str(path) not in rows, f"{path}: two rows"
            rows[str(path)] = LINK.findall(cited)
    return rows


def test_every_record_has_one_row_and_every_row_a_record() -> None:
    recorded = {str(p.relative_to(REPO)) for p in REPO.glob("bench/*/results/*")}
    assert len(recorded) > 40  # the glob found the records
    assert set(index_rows()) == recorded


@pytest.mark.parametrize(("record", "cited"), sorted(index_rows().items()))
def test_every_record_is_cited_by_the_doc_sections_its_row_names(record: str, cited: list[str]) -> None:
    assert cited, f"{record}: no doc cites it; cite it where its figures are quoted, or remove it"
    for link in cited:
        path, _, anchor = link.partition("#")
        doc = (INDEX.parent / path).resolve()
        assert doc.parent == REPO / "docs" or doc == REPO / "README.md", link
        # The record's path, not a longer name it begins (packing-2026-12-01 is not packing-2026-12-01-kept).
        assert re.search(re.escape(record) + r"(?![\w-])", sections(doc)[anchor]), (
            f"{link} does not cite {record}"
        )


@pytest.mark.parametrize("doc", [str(d.relative_to(REPO)) for d in DOCS])
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(doc: str) -> None:
    path = REPO / doc
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in sections(dest):
            broken.append(f"{target}: no such heading")
    assert broken == []


def test_anchors_are_githubs() -> None:
    assert slug("The driver at scale, simulated (`bench/scale/simulate.py`)") == (
        "the-driver-at-scale-simulated-benchscalesimulatepy"
    )
    assert (
        slug("No floor under TPE's kernel widths (2026-12-01)")
        == "no-floor-under-tpes-kernel-widths-2026-12-01"
    )
    assert slug("Memory, predicted before a trial starts (`trainable/memory.py`)") == (
        "memory-predicted-before-a-trial-starts-trainablememorypy"
    )
