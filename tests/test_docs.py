"""The docs cite `file:line` with the code on that line: keep them true."""
from __future__ import annotations

import re

from conftest import REPO

CITATION = re.compile(r"\| `(minift/[\w/]+\.py):(\d+)` \| `(.+?)` \|")


def test_trainer_map_citations_point_at_the_quoted_code():
    text = (REPO / "docs" / "trainer-map.md").read_text()
    citations = CITATION.findall(text)
    assert len(citations) >= 25
    for path, line, code in citations:
        lines = (REPO / path).read_text().splitlines()
        code = code.replace("\\|", "|")
        assert code in lines[int(line) - 1], f"{path}:{line} no longer holds {code!r}"


def test_robustness_table_cites_tests_that_exist():
    text = (REPO / "docs" / "robustness.md").read_text()
    cited = re.findall(r"`(tests/\w+\.py)::(\w+)`", text)
    assert len(cited) >= 30
    for path, name in cited:
        assert f"def {name}(" in (REPO / path).read_text(), f"docs/robustness.md cites {path}::{name}, which is gone"
