"""Shared material ($MINIFT_SHARED, default ../shared beside the repo) and common fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest
from harness import REPO, shared_dir  # benchmarks/ is on pytest's path (setup.cfg)

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


def have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


requires_transformers = pytest.mark.skipif(not have_transformers(),
                                           reason="transformers is not installed (pip install .[bench])")
