"""Shared material ($MINIFT_SHARED, default ../shared beside the repo) and common fixtures."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from harness import REPO, shared_dir  # noqa: F401 (REPO: tests import it from here)

SHARED = shared_dir()
FIXTURES = SHARED / "fixtures"
TWEETS = SHARED / "data" / "tweet_sentiment_extraction"
TOKENIZERS = SHARED / "tokenizers"


def shared_path(*parts: str) -> Path:
    """A path inside the shared folder, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared material not found: {path} (set MINIFT_SHARED to the shared folder)")
    return path


@pytest.fixture
def fixtures_dir() -> Path:
    return shared_path("fixtures")


# -- optional packages: the one way a test says it needs one ----------------------------------------
# package -> the extra of pyproject.toml that installs it. A test that imports one of these carries
# ``@pytest.mark.requires("package", ...)``; without the package it is skipped with this reason.
# tests/test_optional.py checks that no test imports an optional package any other way.
OPTIONAL_PACKAGES = {"transformers": "compare", "accelerate": "compare", "trl": "compare", "peft": "compare",
                     "tensorboard": "tensorboard", "matplotlib": "plot", "psutil": "compare"}


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def missing_reason(packages) -> str | None:
    missing = [p for p in packages if not installed(p)]
    if not missing:
        return None
    extras = sorted({OPTIONAL_PACKAGES[p] for p in missing})
    return f"{', '.join(missing)} not installed (pip install -e '.[{','.join(extras)}]')"


def pytest_runtest_setup(item):
    for marker in item.iter_markers(name="requires"):
        unknown = [p for p in marker.args if p not in OPTIONAL_PACKAGES]
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: requires({unknown}): not in conftest.OPTIONAL_PACKAGES")
        reason = missing_reason(marker.args)
        if reason:
            pytest.skip(reason)
