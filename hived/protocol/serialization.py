"""Turning user code and data into frames, and back.

Functions travel as cloudpickle blobs named by their hash, so a node and each
worker keep one copy per function however many tasks use it. Code from
`__main__` and from the caller's own modules (anything not installed as a
package) is pickled by value, so a worker needs the caller's installed
packages but not its working directory.

Arguments and results use pickle protocol 5 with out-of-band buffers: a numpy
array's memory becomes a frame of its own, sent by ZeroMQ without a copy and
unpickled in place on the other side. Nothing here is ever called on the
control plane; only worker processes and the client unpickle.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import sysconfig
import types
import weakref
from collections import ChainMap
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from hived.errors import SerializationError
from hived.net.frames import ZERO_COPY_MIN

_INSTALLED_ROOTS = tuple(
    os.path.realpath(p)
    for p in {
        sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")
    }
    | {os.path.dirname(os.__file__)}
)
_by_value: set[str] = set()
_modules_seen = 0


def _is_callers_own(module: Any) -> bool:
    """True for a module of the caller's own (not stdlib, not an installed package)."""
    name = getattr(module, "__name__", "")
    if name == "__main__" or name.split(".")[0] == "hived":
        return False
    path = getattr(module, "__file__", None)
    if not path:
        return False
    path = os.path.realpath(path)
    return not path.startswith(_INSTALLED_ROOTS)


def _register_callers_modules() -> None:
    """Pickle the caller's own modules by value; rescan only when new ones load."""
    global _modules_seen
    if len(sys.modules) == _modules_seen:
        return
    for name, module in list(sys.modules.items()):
        if name not in _by_value and "." not in name and _is_callers_own(module):
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:  # not importable under that name any more
                continue
            _by_value.add(name)
    _modules_seen = len(sys.modules)


_cloudpickle_code = cloudpickle.Pickler.dispatch_table[types.CodeType]


def _code_keeping_its_file(code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
    """cloudpickle's reduction of a code object, with the real co_filename
    where cloudpickle (3.0 on) writes "<dynamic-code>": a remote traceback
    then names the file and line the caller's code came from."""
    rebuild, args = _cloudpickle_code(code)
    return rebuild, tuple(
        code.co_filename if isinstance(a, str) and a == "<dynamic-code>" else a for a in args
    )


class _Pickler(cloudpickle.Pickler):
    dispatch_table = ChainMap(
        {types.CodeType: _code_keeping_its_file}, cloudpickle.Pickler.dispatch_table
    )


def _cloudpickle(obj: Any, protocol: int, buffer_callback: Any = None) -> bytes:
    out = io.BytesIO()
    _Pickler(out, protocol=protocol, buffer_callback=buffer_callback).dump(obj)
    return out.getvalue()


# Pickling a function by value costs tens of microseconds, more than the rest
# of a task's round trip, so each function's blob is kept (weakly: the
# function may die) with the identity of every global and closure value it
# names. Rebinding any of them (`x = 6`) makes a fresh blob; changing one in
# place (`x.append(6)`) does not, as with Dask's and Ray's function caches.
_blobs: weakref.WeakKeyDictionary[Any, tuple[tuple[Any, ...], bytes, bytes]] = (
    weakref.WeakKeyDictionary()
)


def dumps_function(fn: Callable[..., Any]) -> tuple[bytes, bytes]:
    """The function's blob and its hash."""
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")
    names = _bindings(fn)
    try:
        cached = _blobs.get(fn)
    except TypeError:  # unhashable callable
        cached = None
    if cached is not None and _same(cached[0], names):
        return cached[1], cached[2]
    _register_callers_modules()
    try:
        blob = _cloudpickle(fn, protocol=5)
    except Exception as exc:
        raise SerializationError(
            f"function {_name_of(fn)} could not be pickled: {type(exc).__name__}: {exc}"
        ) from exc
    digest = function_digest(blob)
    try:
        _blobs[fn] = (names, blob, digest)
    except TypeError:  # not weakly referenceable (a builtin method, say)
        pass
    return blob, digest


def function_digest(blob: bytes) -> bytes:
    """The hash that names a function blob: a node checks every blob it takes against it."""
    return hashlib.blake2b(blob, digest_size=16).digest()


def _same(old: tuple[Any, ...], new: tuple[Any, ...]) -> bool:
    return len(old) == len(new) and all(a is b for a, b in zip(old, new, strict=True))


def _bindings(fn: Any) -> tuple[Any, ...]:
    """The globals and closure values `fn` refers to (kept, and compared by identity)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return ()
    scope = getattr(fn, "__globals__", {})
    values = [scope.get(name) for name in code.co_names]
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            values.append(cell.cell_contents)
        except ValueError:  # an empty cell
            values.append(None)
    return tuple(values)


def _out_of_band(dump: Callable[..., bytes], obj: Any) -> list[Any]:
    """Pickle with `dump`, large buffers as frames of their own."""
    buffers: list[pickle.PickleBuffer] = []

    def keep_large(buf: pickle.PickleBuffer) -> bool:
        # Smaller buffers ride inside the pickle: a frame of their own costs
        # more than the copy (the same bound as for sending without a copy).
        if buf.raw().nbytes >= ZERO_COPY_MIN:
            buffers.append(buf)
            return False
        return True

    head = dump(obj, protocol=5, buffer_callback=keep_large)
    return [head, *(b.raw() for b in buffers)]


def dumps(obj: Any, what: str) -> list[Any]:
    """Frames for `obj`: the pickle, then its large buffers. `what` names it in errors."""
    try:
        return _out_of_band(_cloudpickle, obj)
    except Exception as exc:
        raise SerializationError(f"{what} could not be pickled: {type(exc).__name__}: {exc}") from exc


def dumps_result(obj: Any, what: str) -> list[Any]:
    """Frames for a worker's results: plain pickle when it can, cloudpickle when not.

    Results are mostly plain data, which the C pickler handles several times
    faster. pickle checks that every class it names by reference is the very
    object importable under that name, so a class that only exists by value
    (from the caller's __main__, say) fails here and goes through cloudpickle.
    """
    try:
        return _out_of_band(pickle.dumps, obj)
    except Exception:
        return dumps(obj, what)


def loads(frames: Sequence[Any], what: str) -> Any:
    """The object in `frames` (as made by `dumps`); buffers are used in place."""
    try:
        return pickle.loads(frames[0], buffers=[_view(f) for f in frames[1:]])
    except ModuleNotFoundError as exc:
        raise SerializationError(
            f"{what} could not be unpickled: module {exc.name!r} is not installed here"
        ) from exc
    except (Exception, SystemExit) as exc:  # sys.exit in a __reduce__ is a failed unpickle too
        raise SerializationError(
            f"{what} could not be unpickled: {type(exc).__name__}: {exc}"
        ) from exc


def _view(frame: Any) -> Any:
    return getattr(frame, "buffer", frame)  # zmq.Frame → its memory, without a copy


def _name_of(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
