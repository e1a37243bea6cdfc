"""Fixtures shared by the core's tests."""

from __future__ import annotations

import pytest

from tests.helpers.feeding import SPLITTERS, Splitter


@pytest.fixture(params=sorted(SPLITTERS))
def split(request: pytest.FixtureRequest) -> Splitter:
    """Every core test runs three times: input fed whole, byte by byte and in random chunks."""
    return SPLITTERS[request.param]
