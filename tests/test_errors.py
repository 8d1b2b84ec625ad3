"""The error kinds a node sends, and the exceptions they become in the caller."""

from __future__ import annotations

import pytest

import hived
from hived.errors import ERROR_KINDS, HiveError, InternalError, error_type

# The kinds as they go on the wire, written out: a constant whose value
# changed would break older peers, and this table with it.
BECOMES = {
    "crashed": hived.WorkerCrashed,
    "serialization": hived.SerializationError,
    "unavailable": hived.HiveUnavailable,
    "cancelled": hived.JobCancelled,
    "invalid": HiveError,
    "unknown-blob": HiveError,
    "stopped": HiveError,
    "shutdown": HiveError,
}


def test_the_table_covers_every_kind() -> None:
    assert sorted(BECOMES) == sorted(ERROR_KINDS)


@pytest.mark.parametrize("kind", sorted(BECOMES))
def test_each_kind_becomes_its_exception(kind: str) -> None:
    assert error_type(kind) is BECOMES[kind]


def test_a_kind_of_a_newer_release_is_a_plain_hive_error() -> None:
    assert error_type("out-of-quota") is HiveError


def test_an_internal_error_is_not_a_hive_error() -> None:
    # (tests/test_wire.py raises one for real: a message type registered twice)
    assert not issubclass(InternalError, HiveError)
