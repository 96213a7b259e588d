"""The supervisor's heap made immortal before the first fork (issue 17, kraite_mp.supervisor.immortal).

Each case runs in a fresh interpreter of its own, never in pytest's: an immortal object is never freed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kraite_mp.supervisor import immortal

#: A fresh interpreter gets this long to run a script here.
SCRIPT_TIMEOUT_S = 60.0

SCRIPT = textwrap.dedent(
    """
    import gc, io, os, sys, weakref
    from kraite_mp.supervisor import immortal

    class Closes:
        def __del__(self):
            print("finalized", flush=True)

    class Plain:
        pass

    def work(n):
        return [CONSTANT, n, Plain]

    CONSTANT = ("a tuple", "of constants", 1.5)
    finalizing = Closes()
    plain = Plain()
    handle = open(os.devnull, "rb")
    gc.disable()
    made = immortal.immortalize_heap()
    print("made", made, flush=True)
    if not immortal.supported():
        assert made == 0 and not immortal.is_immortal(work)
        print("unsupported", flush=True)
        sys.exit(0)
    assert made > 1000, made
    for obj in (work, work.__code__, work.__globals__, CONSTANT, Plain, plain, immortal, gc.get_objects):
        assert immortal.is_immortal(obj), obj
    # what cleans up when dropped keeps its count
    assert not immortal.is_immortal(finalizing) and not immortal.is_immortal(handle)
    # taking and dropping references writes nothing to an immortal object
    before = sys.getrefcount(work)
    refs = [work for _ in range(1000)]
    assert sys.getrefcount(work) == before
    del refs
    # objects made afterwards are mortal and freed as usual
    later = Plain()
    gone = weakref.ref(later)
    assert not immortal.is_immortal(later)
    del later
    assert gone() is None
    # a second call changes only what was made since
    fresh = [Plain(), "new " + str(os.getpid())]
    again = immortal.immortalize_heap()
    assert 0 < again < made, (again, made)
    assert immortal.is_immortal(fresh)
    # a forked child shares the immortal objects: its calls leave their counts alone
    pid = os.fork()
    if pid == 0:
        ok = all(work(i)[0] is CONSTANT for i in range(100)) and sys.getrefcount(work) == before
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    handle.close()
    del finalizing  # its finalizer runs: it was left mortal
    print("done", flush=True)
    """
)


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, check=False
    )


@pytest.mark.unit
def test_immortal_objects_keep_their_counts_and_the_rest_stays_mortal() -> None:
    result = _run(SCRIPT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    if not immortal.supported():
        assert "unsupported" in lines
        return
    assert lines[-2:] == ["finalized", "done"], result.stdout
    # the interpreter shuts down cleanly with immortal objects in its heap
    assert "Traceback" not in result.stderr and "Fatal" not in result.stderr, result.stderr


@pytest.mark.unit
def test_supported_only_where_the_sentinel_is_the_one_written() -> None:
    expected = (
        sys.implementation.name == "cpython"
        and sys.version_info[:2] in ((3, 12), (3, 13))
        and not hasattr(sys, "gettotalrefcount")
    )
    import sysconfig

    expected = expected and not sysconfig.get_config_var("Py_GIL_DISABLED")
    assert immortal.supported() is bool(expected)
    # None is immortal wherever immortality exists; a new object never is
    assert immortal.is_immortal(None) is immortal.supported()
    assert not immortal.is_immortal(object())
