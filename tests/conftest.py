"""Shared pytest fixtures.

prepare_* fixtures and ``prepared_sample`` belong to the data-preparation area
(trainer/prepare.py); other areas may append their own fixtures below.
"""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def prepare_cache_dir(tmp_path_factory) -> Path:
    """A cache root (AUTORESEARCH_CACHE layout) private to this test session."""
    return tmp_path_factory.mktemp("prepare_cache")


@pytest.fixture(scope="session")
def prepared_sample(prepare_cache_dir) -> Path:
    """The embedded sample prepared once per session at vocab 512; returns the dataset dir.

    The directory is <cache>/datasets/sample (so its parent's parent is a usable
    AUTORESEARCH_CACHE, and CURRENT points at it). Treat it as read-only.
    """
    from trainer.prepare import prepare_sample

    return prepare_sample(prepare_cache_dir, vocab_size=512)
