"""Shared test setup."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory, monkeypatch):
    """Every test (and every process it starts) caches tokenized data in a temporary folder of its own,
    never in the user's `~/.cache/deltatune/data`, and never reads a cache another test left."""
    monkeypatch.setenv("DELTATUNE_DATA_CACHE", str(tmp_path_factory.mktemp("data-cache")))
