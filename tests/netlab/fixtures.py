"""Pytest fixtures for the netlab: one lab per test module, healed between tests.

Use from a test module with ``from tests.netlab.fixtures import *``. Faults are reverted
after every test (``Lab.heal`` waits until every agent sees the whole mesh reachable again),
so the tests of a module share one lab and its start-up cost.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import require
from tests.netlab import Lab, lab, unavailable_reason

#: The probing the issue's figures are stated for.
INTERVAL = 1.0
TIMEOUT = 0.5


@pytest.fixture(scope="module")
def module_lab() -> Iterator[Lab]:
    """Four hosts with health endpoints and agents (icmp + http, 1 s / 500 ms), per module."""
    require(unavailable_reason())
    with lab(4, probing={"interval": "1s", "timeout": "500ms"}) as the_lab:
        yield the_lab


@pytest.fixture
def netlab(module_lab: Lab) -> Iterator[Lab]:
    """The module's lab, healthy at the start of the test and healed after it."""
    yield module_lab
    module_lab.heal()


__all__ = ["INTERVAL", "TIMEOUT", "module_lab", "netlab"]
