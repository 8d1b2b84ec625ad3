"""What travels: functions by value from the caller's own code, buffers out of band."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hived.errors import SerializationError
from hived.net.frames import ZERO_COPY_MIN
from hived.protocol import serialization
from hived.protocol.serialization import dumps, dumps_function, dumps_result, loads


def test_large_buffers_travel_as_frames_of_their_own():
    array = np.arange(ZERO_COPY_MIN, dtype=np.uint8)
    frames = dumps((array, "small"), "x")
    assert len(frames) == 2 and frames[1].nbytes == array.nbytes
    back, text = loads(frames, "x")
    assert text == "small" and np.array_equal(back, array)


def test_loads_uses_the_received_buffer_in_place():
    array = np.arange(ZERO_COPY_MIN, dtype=np.uint8)
    head, buf = dumps(array, "x")
    received = bytearray(buf)  # what a socket hands us
    back = loads([head, received], "x")
    received[0] = 99
    assert back[0] == 99  # no copy was made


def test_small_buffers_stay_inside_the_pickle():
    assert len(dumps(np.zeros(10), "x")) == 1


def test_results_use_plain_pickle_and_fall_back_to_cloudpickle():
    assert pickle.loads(dumps_result([1, "a"], "r")[0]) == [1, "a"]
    frames = dumps_result(lambda: 3, "r")
    assert loads(frames, "r")() == 3


def test_a_function_of_the_callers_module_is_pickled_by_value(tmp_path):
    mod = tmp_path / "mytasks.py"
    mod.write_text("def triple(x):\n    return 3 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import mytasks

        blob, _ = dumps_function(mytasks.triple)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mytasks", None)
    # A fresh interpreter without the module on its path can still run it.
    code = textwrap.dedent(f"""
        import pickle
        fn = pickle.loads({blob!r})
        print(fn(14))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "42", out.stderr


def test_an_installed_module_is_pickled_by_reference():
    import json

    blob, _ = dumps_function(json.dumps)
    assert len(blob) < 100 and b"json" in blob


def test_the_blob_is_reused_until_a_global_it_names_is_rebound():
    global OFFSET
    OFFSET = [1]

    def shifted(x):
        return x + OFFSET[0]

    first = dumps_function(shifted)
    assert dumps_function(shifted) == first
    OFFSET = [2]
    second = dumps_function(shifted)
    assert second != first
    assert pickle.loads(second[0])(1) == 3


def test_unpicklable_things_name_what_failed():
    import threading

    lock = threading.Lock()
    with pytest.raises(SerializationError, match="function .*could not be pickled"):
        dumps_function(lambda: lock)
    with pytest.raises(SerializationError, match="the arguments could not be pickled"):
        dumps(lock, "the arguments")
    with pytest.raises(SerializationError, match="garbage could not be unpickled"):
        loads([b"not a pickle"], "garbage")


def test_a_missing_module_is_named(tmp_path):
    (tmp_path / "gone_soon.py").write_text("def f():\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import gone_soon

        frames = [pickle.dumps(gone_soon.f)]  # by reference, as for an installed package
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gone_soon", None)
    with pytest.raises(SerializationError, match="module 'gone_soon' is not installed here"):
        loads(frames, "the function")


def test_hived_itself_is_never_pickled_by_value():
    from hived.node import worker

    assert not serialization._is_callers_own(worker)
