"""docs/trainer-map.md cites `file:line` plus the code on that line, on the transformers/accelerate side
and on minift's: keep both true, and refuse a citation that is stale or ambiguous. The text of
trainer-map.md and how-trainer-works.md cites upstream lines and minift names (both must hold), and its
numbers come from scripts: how-trainer-works.md's from docs/how_trainer_works_numbers.py (a run of
Trainer and minift side by side), trainer-map.md's padding efficiencies from benchmarks/padding.py."""
from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest

from conftest import REPO, shared_path


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


trainer_map = _load("update_trainer_map")
numbers = _load("how_trainer_works_numbers")
TEXT = (REPO / "docs" / "trainer-map.md").read_text(encoding="utf-8")
HOW = (REPO / "docs" / "how-trainer-works.md").read_text(encoding="utf-8")


def test_every_row_cites_both_sides():
    lines = TEXT.splitlines()
    start, end = trainer_map.table_span(lines)
    table = lines[start:end]
    assert len(table) == len(trainer_map.rows) >= 45
    assert len(trainer_map.cited(TEXT)) == len(table), \
        "a row lacks a transformers/accelerate or minift citation"


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
    row = next(line for line in TEXT.splitlines() if "`minift/optim.py:" in line and "zero_grad" in line)
    moved = TEXT.replace(row, row.replace("`minift/optim.py:", "`minift/optim.py:1", 1))
    assert any("which is on line" in e for e in trainer_map.check(moved, root=None))


def test_robustness_table_cites_tests_that_exist():
    text = (REPO / "docs" / "robustness.md").read_text()
    cited = re.findall(r"`(tests/\w+\.py)::(\w+)`", text)
    assert len(cited) >= 30
    for path, name in cited:
        assert f"def {name}(" in (REPO / path).read_text(), \
            f"docs/robustness.md cites {path}::{name}, which is gone"


# -- the text around the tables: upstream lines and minift names -------------------------------------------
def test_prose_citations_point_at_their_code():
    root, versions = trainer_map.upstream_root()
    if root is None:
        pytest.skip(f"transformers/accelerate lines not checked: {versions}")
    texts = [path.read_text(encoding="utf-8") for path in trainer_map.PROSE_DOCS]
    assert trainer_map.check_prose(texts, root) == []


def test_a_cited_line_without_its_code_fails():
    root, versions = trainer_map.upstream_root()
    if root is None:
        pytest.skip(f"transformers/accelerate lines not checked: {versions}")
    assert ("transformers/trainer.py", 1881) in trainer_map.prose_citations(HOW)
    moved = HOW.replace("called at `:1881`", "called at `:1880`")
    errors = trainer_map.check_prose([moved, TEXT], root)
    assert any("trainer.py:1880 is cited" in e for e in errors)
    assert any("1881" in e and "cited by no doc" in e for e in errors)


def test_every_minift_name_in_the_docs_exists():
    for path in trainer_map.PROSE_DOCS:
        text = path.read_text(encoding="utf-8")
        assert len(trainer_map.minift_names(text)) >= 10, path
        assert trainer_map.unknown_minift_names(text) == [], path


def test_a_minift_name_that_does_not_exist_is_caught():
    text = "`finetune.run_eval`, `models.layers.lm_loss_sum`, `models.lm_loss.lm_loss_sum`, `train.seed`, " \
           "`train.no_such_key`, `loop.py`, `model.set_hot_path`"
    assert trainer_map.unknown_minift_names(text) == ["finetune.run_eval", "models.layers.lm_loss_sum",
                                                      "train.no_such_key"]


# -- how-trainer-works.md: every measured number is the script's ---------------------------------------------
def test_how_trainer_works_numbers_match_the_last_measurement():
    measured = json.loads(numbers.SNAPSHOT.read_text(encoding="utf-8"))
    assert numbers.check(HOW, measured) == []
    assert len(numbers.blocks(HOW)) == len(numbers.expected(measured)) >= 10


def test_a_number_that_drifts_or_appears_fails():
    measured = json.loads(numbers.SNAPSHOT.read_text(encoding="utf-8"))
    eval_loss = f"{measured['random']['eval']['minift']:.7f}"
    assert eval_loss in numbers.blocks(HOW)["eval"]
    drifted = HOW.replace(eval_loss, f"{measured['random']['eval']['minift'] + 3e-5:.7f}")
    assert any("block 'eval'" in e for e in numbers.check(drifted, measured))
    extra = HOW.replace("<!-- numbers:count -->\n", "<!-- numbers:count -->\n(of 6) ")
    assert any("block 'count' holds 4 numbers" in e for e in numbers.check(extra, measured))
    worse = {**measured["random"], "diff": {**measured["random"]["diff"], "weights": 1.0}}
    loose = dict(measured, random=worse)
    assert any("is below the measured" in e for e in numbers.check(HOW, loose))
    reordered = HOW.replace("`on_pre_optimizer_step` (after clipping) → `on_optimizer_step`",
                            "`on_optimizer_step` → `on_pre_optimizer_step` (after clipping)")
    assert any("block 'events' lists" in e for e in numbers.check(reordered, measured))


@pytest.mark.slow
@pytest.mark.requires("transformers", "accelerate")
def test_how_trainer_works_numbers_match_a_fresh_measurement():
    """Reruns Trainer and minift side by side (~30 s): the doc, and the snapshot the default suite
    uses, must both be what the code measures today."""
    shared_path("fixtures", "tiny-openai-gpt")
    measured = numbers.measure()
    assert numbers.check(HOW, measured) == []
    snapshot = json.loads(numbers.SNAPSHOT.read_text(encoding="utf-8"))
    assert numbers.check(numbers.write(HOW, snapshot), measured) == []  # the snapshot is today's too


# -- trainer-map.md: padding efficiencies are benchmarks/padding.py's -------------------------------------
@pytest.mark.slow
def test_trainer_map_padding_efficiencies_are_what_padding_py_measures():
    """Tokenizes the 27k train tweets (~7 s)."""
    shared_path("data", "tweet_sentiment_extraction")
    shared_path("tokenizers", "openai-gpt")
    import padding

    _, rows = padding.efficiencies(batch_size=32)
    value = dict(rows)
    random = value["random batches, padded to the longest"]
    grouped = value["length-grouped, padded to the longest"]
    fixed = value["random batches, padded to 512 (classic recipe)"]
    number = r"(\d\.\d+)"
    (low, batch, high), = re.findall(rf"efficiency from {number} \(random batches of (\d+)\) to {number}",
                                     TEXT)
    assert (low, int(batch), high) == (f"{random:.{len(low) - 2}f}", 32, f"{grouped:.{len(high) - 2}f}")
    (classic,) = re.findall(r"padding efficiency (\d\.\d+) on the real train split", TEXT)
    assert classic == f"{fixed:.{len(classic) - 2}f}"
    (floor,) = re.findall(r"padding to the\s+longest sequence reaches ≥ (\d\.\d+)", TEXT)
    assert grouped >= float(floor)
