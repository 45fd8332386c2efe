"""The test helpers themselves: a race helper that swallowed a thread's failure would let every
race test pass with the behaviour it checks missing."""

from __future__ import annotations

import threading

import pytest

from tests.util import run_threads


def test_run_threads_fails_when_a_thread_raises():
    def target(k):
        if k == 1:
            raise EOFError("boom")
    with pytest.raises(EOFError, match="boom"):
        run_threads(target, [(0,), (1,), (2,)], 5)


def test_run_threads_fails_when_a_thread_does_not_finish():
    release = threading.Event()
    try:
        with pytest.raises(AssertionError, match="1 of 2 threads still running"):
            run_threads(lambda k: k or release.wait(10), [(0,), (1,)], 0.2)
    finally:
        release.set()
