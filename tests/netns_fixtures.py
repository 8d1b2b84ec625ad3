"""pytest fixtures for tests across real hosts (network namespaces of
hived.testing.netns), and `require_netns`: skip, or fail under CI, without them.

To use them everywhere, from ``tests/conftest.py``::

    pytest_plugins = ["netns_fixtures"]

(or ``from netns_fixtures import testnet, net3, net5  # noqa: F401``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hived.testing.netns import TestNet, netns_available


def require_netns() -> None:
    """Skip the test (outside CI) or fail it (``CI=true``) if namespaces can't be made."""
    ok, why = netns_available()
    if ok:
        return
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture
def testnet() -> Iterator[Callable[..., TestNet]]:
    """Factory: ``testnet(n, names=None) -> TestNet`` with ``n`` hosts.

    Skips the test without root outside CI (fails it under ``CI=true``).  Every
    TestNet made is torn down after the test -- processes, namespaces, links --
    whether the test passed or not; a teardown that leaves something behind
    errors the test.
    """
    require_netns()
    nets: list[TestNet] = []

    def make(n: int = 3, **kw: Any) -> TestNet:
        net = TestNet(n, **kw)
        nets.append(net)
        return net

    yield make
    errors = []
    for net in reversed(nets):
        try:
            net.close()
        except Exception as exc:  # noqa: BLE001 - close them all, then report
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def net3(testnet: Callable[..., TestNet]) -> TestNet:
    """Three hosts, h0..h2."""
    return testnet(3)


@pytest.fixture
def net5(testnet: Callable[..., TestNet]) -> TestNet:
    """Five hosts, h0..h4."""
    return testnet(5)
