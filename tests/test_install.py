"""The README's install, in a fresh virtual environment: `import minift` works from the repo root
and from the folder holding the clone, where the clone folder itself is also named minift."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow  # a venv and an editable install: ~10 s
def test_editable_install_imports_from_the_folder_that_holds_the_clone(tmp_path):
    venv = tmp_path / "venv"
    # --system-site-packages: torch, the other dependencies, pip and setuptools are reused, nothing is
    # downloaded
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "-e", str(REPO)], capture_output=True, text=True, env=env)
    assert install.returncode == 0, install.stderr[-2000:]
    parent = tmp_path / "work"
    parent.mkdir()
    (parent / "minift").symlink_to(REPO)  # the README's layout: <parent>/minift (the clone) beside shared/
    probe = "import minift; print(minift.__file__); print(minift.from_pretrained.__module__)"
    for cwd in (parent, REPO):
        result = subprocess.run([python, "-c", probe], cwd=cwd, capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"from {cwd}: {result.stderr[-2000:]}"
        assert result.stdout.split() == [str(REPO / "minift" / "__init__.py"), "minift.hub"], f"from {cwd}"
