"""The supervisor's heap made immortal before its first fork, so that children stop copying it.

A forked child shares the parent's pages until it writes to one. CPython writes to an object whenever it
takes or drops a reference to it: calling a function, reading a module global, loading a constant, looking
up a method. An idle user-data child runs only a few hundred functions, but each of those writes lands on a
page of the parent's heap, and the page is copied into the child. That was most of an idle child's 10.5 MB
of private memory (docs/BENCHMARKS.md, issue 17).

PEP 683 (CPython 3.12) made some objects *immortal*: their count is a sentinel that ``Py_INCREF`` and
``Py_DECREF`` leave alone, and CPython's own static objects and interned strings use it. The PEP names the
pre-fork server as the use case. The supervisor applies the same sentinel once, after its warm-up
(``process.prepare_to_fork``) and before the first fork, to every object it can reach from the collector's
lists: modules, classes, functions, code objects with their constants, the settings, and the warm-up's
leftovers. A child that touches them then writes nothing to their pages. Meta's Cinder does the same
before forking its web workers (``gc.immortalize_heap``).

What it costs and what it keeps:
- An immortal object is never freed, in the parent or in a child. The objects alive at that moment (about
  110,000 on CPython 3.13: the imported code and the start-up state) stay for the process's life. That is
  paid once, and objects allocated later are untouched.
- Objects that clean up when they are dropped keep their counts, so dropping one still closes it. These
  are the types with a finalizer (``__del__``: files, sockets, generators, sqlite connections) and frames.
- This depends on where CPython 3.12 and 3.13 keep the sentinel: the low 32 bits of ``ob_refcnt`` set to
  ``0xFFFFFFFF``, checked by the sign of that 32-bit half. Anywhere else nothing is done: 3.11, 3.14 and
  later, free-threaded and debug builds, and other interpreters. ``supported()`` says which case applies.
- ``supervisor.immortalize_before_fork = false`` turns it off.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import sys
import sysconfig
import types
from typing import Any

#: ``_Py_IMMORTAL_REFCNT`` of CPython 3.12 and 3.13 on 64-bit builds (``UINT_MAX``).
IMMORTAL_REFCNT = 0xFFFFFFFF

#: The CPython versions whose immortal sentinel this module writes.
SUPPORTED_VERSIONS = ((3, 12), (3, 13))


def supported() -> bool:
    """True where the sentinel's layout is the one this module writes: CPython 3.12 or 3.13, a 64-bit,
    release, GIL build."""
    return (
        platform.python_implementation() == "CPython"
        and sys.version_info[:2] in SUPPORTED_VERSIONS
        and sys.maxsize > 2**32
        and not hasattr(sys, "gettotalrefcount")  # a debug build counts references in its own way
        and not sysconfig.get_config_var("Py_GIL_DISABLED")  # free-threaded: split, per-thread counts
    )


#: Where the low 32-bit half of ``ob_refcnt`` lies in the object (``ob_refcnt_split[PY_BIG_ENDIAN]``).
_LOW_HALF = 4 if sys.byteorder == "big" else 0


def is_immortal(obj: object) -> bool:
    """Whether CPython treats ``obj`` as immortal: the sign of the 32-bit half of its count (3.12, 3.13)."""
    return supported() and ctypes.c_int32.from_address(id(obj) + _LOW_HALF).value < 0


def _keeps_count(obj: object) -> bool:
    """Objects that must stay mortal: those that clean up when dropped, and frames."""
    kind = type(obj)
    try:
        return kind is types.FrameType or hasattr(kind, "__del__")
    except Exception:  # noqa: BLE001 - a metaclass's own __getattr__: keep the count, to be safe
        return True


def _referents(obj: object) -> list[Any]:
    if type(obj) is types.CodeType:  # code objects are not tracked by the collector: name their parts
        code: types.CodeType = obj
        return [
            *code.co_consts,
            *code.co_names,
            *code.co_varnames,
            *code.co_freevars,
            *code.co_cellvars,
            code.co_code,
            code.co_filename,
            code.co_name,
            code.co_qualname,
            code.co_linetable,
            code.co_exceptiontable,
        ]
    return gc.get_referents(obj)


def immortalize_heap() -> int:
    """Make every object reachable from the collector's lists immortal, except the ones that must stay
    mortal (``_keeps_count``). Returns how many objects it changed: 0 where ``supported()`` is False.

    Call it once, in the supervisor, after the warm-up and before the first fork, with the collector off
    (``prepare_to_fork``). A second call does nothing new to the objects of the first, and changes the
    objects allocated since."""
    if not supported():
        return 0
    stack: list[Any] = gc.get_objects()
    seen: set[int] = {id(stack)}
    seen.add(id(seen))
    changed = 0
    while stack:
        obj = stack.pop()
        key = id(obj)
        if key in seen:
            continue
        seen.add(key)
        if _keeps_count(obj):
            continue
        if ctypes.c_uint32.from_address(key + _LOW_HALF).value != IMMORTAL_REFCNT:
            ctypes.c_ssize_t.from_address(key).value = IMMORTAL_REFCNT
            changed += 1
        stack.extend(_referents(obj))
    return changed
