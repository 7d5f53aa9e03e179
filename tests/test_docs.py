"""docs/trainer-map.md cites `file:line` plus the code on that line, on the transformers/accelerate side
and on minift's: keep both true, and refuse a citation that is stale or ambiguous."""
from __future__ import annotations

import importlib.util

import re

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("update_trainer_map", REPO / "docs" / "update_trainer_map.py")
trainer_map = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trainer_map)
TEXT = (REPO / "docs" / "trainer-map.md").read_text(encoding="utf-8")


def test_every_row_cites_both_sides():
    lines = TEXT.splitlines()
    start, end = trainer_map.table_span(lines)
    table = lines[start:end]
    assert len(table) == len(trainer_map.rows) >= 45
    assert len(trainer_map.cited(TEXT)) == len(table), "a row lacks a transformers/accelerate or minift citation"


def test_minift_citations_point_at_the_quoted_code():
    assert trainer_map.check(TEXT, root=None) == []


def test_transformers_citations_point_at_the_quoted_code():
    root, versions = trainer_map.upstream_root()
    if root is None:
        pytest.skip(f"transformers/accelerate half not checked: {versions}")
    assert trainer_map.check(TEXT, root) == []


def test_a_stale_or_ambiguous_citation_fails(tmp_path):
    source = tmp_path / "code.py"
    source.write_text("a = 1\nmodel.zero_grad()\nb = 2\nmodel.zero_grad()\nstep += 1\n")
    assert trainer_map.locate(source, "model.zero_grad()" + trainer_map.NEXT_LINE + "step += 1") == 4
    with pytest.raises(trainer_map.CitationError, match="ambiguous"):
        trainer_map.locate(source, "model.zero_grad()")
    with pytest.raises(trainer_map.CitationError, match="stale"):
        trainer_map.locate(source, "optimizer.zero_grad()")
    row = next(line for line in TEXT.splitlines() if "`minift/loop.py:" in line and "zero_grad" in line)
    moved = TEXT.replace(row, row.replace("`minift/loop.py:", "`minift/loop.py:1", 1))
    assert any("which is on line" in e for e in trainer_map.check(moved, root=None))


def test_robustness_table_cites_tests_that_exist():
    text = (REPO / "docs" / "robustness.md").read_text()
    cited = re.findall(r"`(tests/\w+\.py)::(\w+)`", text)
    assert len(cited) >= 30
    for path, name in cited:
        assert f"def {name}(" in (REPO / path).read_text(), f"docs/robustness.md cites {path}::{name}, which is gone"
