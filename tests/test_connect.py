"""`hived.connect` sizing an embedded hive: `cpus=N`, HIVED_CPUS, and bad values.

The slots are read where they are made: the Hive's WELCOME (`slots`) and
the embedded node's pool (its worker processes).
"""

from __future__ import annotations

import psutil
import pytest

import hived
from hived.errors import ConfigError
from hived.node.resources import usable_cpus
from hived.testing.waiting import wait_for


def worker_count(h: hived.Hive) -> int:
    return len(h.link.node.pool.workers)


def own_pid(_=None):
    import os

    return os.getpid()


@pytest.mark.parametrize("value", ["1", " 1 "])
def test_hived_cpus_1_gives_one_slot(monkeypatch, value) -> None:
    monkeypatch.setenv("HIVED_CPUS", value)
    with hived.connect("embedded") as h:
        assert h.slots == 1
        assert worker_count(h) == 1
        assert len(set(h.map(own_pid, range(20)))) == 1


def test_connect_cpus_wins_over_hived_cpus(monkeypatch) -> None:
    monkeypatch.setenv("HIVED_CPUS", "1")
    with hived.connect("embedded", cpus=3) as h:
        assert h.slots == 3
        wait_for(lambda: worker_count(h) == 3, 10, what="3 workers")


def test_hived_cpus_auto_or_unset_is_this_machines_cpus(monkeypatch) -> None:
    monkeypatch.setenv("HIVED_CPUS", "auto")
    with hived.connect("embedded") as h:
        assert h.slots == usable_cpus()
    monkeypatch.delenv("HIVED_CPUS")
    with hived.connect("embedded") as h:
        assert h.slots == usable_cpus()


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_hived_cpus_is_one_clear_error(monkeypatch, value) -> None:
    monkeypatch.setenv("HIVED_CPUS", value)
    before = psutil.Process().children(recursive=True)
    with pytest.raises(ConfigError) as caught:
        hived.connect("embedded")
    assert str(caught.value) == (
        f'environment HIVED_CPUS: pool.cpus: expected "auto" or an integer >= 1, got "{value}"'
    )
    assert psutil.Process().children(recursive=True) == before  # nothing was started


@pytest.mark.parametrize("value", [0, -2, "2", 1.5, True])
def test_a_bad_cpus_keyword_is_one_clear_error(value) -> None:
    with pytest.raises(ValueError, match=rf"^cpus must be an integer >= 1, got {value!r}$"):
        hived.connect("embedded", cpus=value)
