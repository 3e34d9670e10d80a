"""Read-ahead: yields the items of an iterator produced by a background thread, in order.

    items ──producer thread (decode)──► queue (depth) ──consumer (train loop)──► items
    an exception while producing → re-raised at its place in the sequence
    consumer closes early → the producer stops at its next put
    interpreter exit → producers still running are stopped and joined (atexit)

The in-process reader (`msrec_dist.data.reader`, `reader.prefetch_thread`) decodes batches
here while the train step runs.
"""
from __future__ import annotations

import atexit
import queue
import threading
from typing import Iterator

# Read-ahead producers still running: stopped and joined at interpreter exit (below).
_LIVE_READ_AHEAD: set[tuple[threading.Event, threading.Thread]] = set()


@atexit.register
def _stop_read_ahead_threads(timeout_s: float = 2.0) -> None:
    """Stops and joins the producers of iterators that were never exhausted or closed.

    A daemon thread still decoding (inside pyarrow / torch C++ code) when the interpreter
    finalizes is torn down mid-call, which aborts the process ("terminate called without an
    active exception", exit code 134) after all the work is done; a benchmark that abandons
    one iterator per measured cell hit this. atexit runs while threads can still finish.
    """
    for stop, thread in list(_LIVE_READ_AHEAD):
        stop.set()
    for stop, thread in list(_LIVE_READ_AHEAD):
        thread.join(timeout_s)


def read_ahead(items: Iterator, depth: int) -> Iterator:
    """Yields `items` in order, produced by a background thread up to `depth` ahead; an exception
    raised while producing is re-raised here, at its place in the sequence.

    Why by hand: DataLoader prefetches only with worker processes, whose per-batch hand-off caps
    them at ~0.2M rows/s on this kind of machine (benchmarks/results/reader_throughput.md), while
    the in-process reader decodes 1-1.6M rows/s. A thread overlaps that decode (pyarrow, numpy and
    torch release the GIL) with the train step in the same process.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001  handed to the consumer, raised there
            put(("error", e))
        finally:
            _LIVE_READ_AHEAD.discard(entry)

    thread = threading.Thread(target=produce, name="msrec-read-ahead", daemon=True)
    entry = (stop, thread)
    _LIVE_READ_AHEAD.add(entry)
    thread.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:  # consumer done or closed early: let the producer stop at its next put
        stop.set()
