"""Fixtures of the digest tests (helpers in digest_world.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digest_world import World, open_store


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    config, store = open_store(tmp_path)
    try:
        yield World(config, store)
    finally:
        store.close()
