"""The in-process reader's read-ahead thread (msrec_dist/data/read_ahead.py): order, a
producer's error at its place, early close, and producers stopped at interpreter exit."""
from __future__ import annotations

import threading
import time

import pytest

import msrec_dist.data.read_ahead as RA
from msrec_dist.data.read_ahead import read_ahead
from msrec_dist.data.schema import DataError


def test_read_ahead_keeps_order_errors_and_stops():
    """The in-process reader's read-ahead thread: same items in the same order, a producer's
    exception raised at its place, and closing early stops the thread."""
    assert list(read_ahead(iter(range(50)), 3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise DataError("bad.parquet: column 'click', row 7: NaN label")

    got = []
    with pytest.raises(DataError, match="bad.parquet: column 'click', row 7"):
        for x in read_ahead(failing(), 2):
            got.append(x)
    assert got == [1, 2]

    it = read_ahead(iter(range(10_000)), 2)
    assert next(it) == 0
    it.close()
    deadline = time.time() + 5
    while any(t.name == "msrec-read-ahead" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "msrec-read-ahead" for t in threading.enumerate())


def test_read_ahead_threads_stopped_at_exit():
    """An iterator abandoned mid-stream (neither exhausted nor closed, as a benchmark cell leaves
    it) keeps its producer alive; the atexit hook stops and joins it, so no thread is still
    inside pyarrow/torch code while the interpreter finalizes (that aborted a 2-rank benchmark
    process at exit)."""
    def slow():
        for i in range(10_000):
            time.sleep(0.002)
            yield i

    it = read_ahead(slow(), 2)
    assert next(it) == 0
    (stop, thread), = [e for e in RA._LIVE_READ_AHEAD if e[1].is_alive()]
    RA._stop_read_ahead_threads(timeout_s=5.0)
    assert stop.is_set() and not thread.is_alive()
    assert (stop, thread) not in RA._LIVE_READ_AHEAD
    del it
