"""Fixtures the relay's attack modules share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.attack import own_dovecot
from tests.helpers.dovecot import Dovecot


@pytest.fixture(scope="module")
def target() -> Iterator[Dovecot]:
    """A Dovecot of the module's own (`own_dovecot`): what one module's attacks leave behind
    (connections, a flooded log) never meets another module's."""
    with own_dovecot() as server:
        yield server
