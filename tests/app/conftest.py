"""Fixtures of the page tests (helpers: ``tests/apptest_kit.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from apptest_kit import fresh_projects


@pytest.fixture
def projects(tmp_path, monkeypatch) -> Path:
    """A fresh projects folder: the app creates the demo project inside it on first start."""
    return fresh_projects(tmp_path, monkeypatch)
