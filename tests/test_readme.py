"""Every ```python block of README.md runs as written, from a folder beside shared/."""
from __future__ import annotations

import re

import pytest

from conftest import REPO, SHARED, shared_path

BLOCKS = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(encoding="utf-8"), re.M | re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    if "../shared" in code:
        shared_path("fixtures")  # skips, saying why, without the shared material
        code = code.replace("../shared", str(SHARED))
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the README's paths are relative to the repo root
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})
