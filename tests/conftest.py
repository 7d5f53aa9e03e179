"""Shared material ($MINIFT_SHARED, default ../shared beside the repo) and common fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIFT_SHARED", REPO.parent / "shared")).expanduser()
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
