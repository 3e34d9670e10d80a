"""One epoch's row order for the reader (`reader.shuffle`): a pure function of (seed, epoch, row
groups), so any rank or worker reads any slice of it and a resumed loader the rest of it.

    EpochOrder(row groups, their global starts, key = (seed, epoch) or None, window)
        .ranges(a, b) → global row ranges of positions [a, b)
        .batch(a, b)  → those ranges, or with shuffle windows the windows' slices (WindowSlices)
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

Range = tuple[int, int]  # [start, end) global rows


@dataclass
class WindowSlices:
    """A shuffled batch: per shuffle window it lies in (one, or two where it straddles a boundary):
    (j, the window's rows in order, its row ranges before the permutation, the permutation, the
    row groups overlapping the window, lo, hi): rows[lo:hi]."""

    parts: list[tuple[int, np.ndarray, list[Range], np.ndarray, frozenset[int], int, int]]


class EpochOrder:
    """One epoch's row order over whole row groups (global ids into `gstarts`).

    Unshuffled (key None): the row groups as given. Shuffled: the row groups permuted by a generator
    seeded with [*key, 0], then each window of `window` consecutive rows of that order permuted by one
    seeded with [*key, 1 + j] (window j; window <= 1: row groups only). Every position is a pure
    function of (key, window, row groups): any rank or worker reads any slice of it, and a resumed
    loader the rest of it."""

    def __init__(self, rgs: list[int], gstarts: np.ndarray, key: tuple[int, ...] | None, window: int):
        if key is not None:
            rgs = [rgs[i] for i in np.random.default_rng([*key, 0]).permutation(len(rgs))]
        self.rgs, self.gstarts, self.key = rgs, gstarts, key
        self.window = window if key is not None and window > 1 else 0
        self.cum = [0]  # position of each row group's first row in the order, then the total
        for r in rgs:
            self.cum.append(self.cum[-1] + int(gstarts[r + 1] - gstarts[r]))
        self.total = self.cum[-1]
        self._win: tuple | None = None  # (j, rows of window j in order, its ranges before the permutation, permutation)

    def ranges(self, a: int, b: int) -> list[Range]:
        """Positions [a, b) as global row ranges, in order (adjacent ones merged)."""
        out: list[Range] = []
        i = bisect.bisect_right(self.cum, a) - 1
        while a < b:
            s = int(self.gstarts[self.rgs[i]]) + a - self.cum[i]
            e = s + min(b, self.cum[i + 1]) - a
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
            a, i = a + e - s, i + 1
        return out

    def _window_rows(self, j: int) -> tuple:
        """(j, window j's rows in order, its row ranges before the permutation, the permutation)."""
        if self._win is None or self._win[0] != j:
            lo = j * self.window
            ranges = self.ranges(lo, min(lo + self.window, self.total))
            rows = np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in ranges])
            perm = np.random.default_rng([*self.key, 1 + j]).permutation(len(rows))
            self._win = (j, rows[perm], ranges, perm)
        return self._win

    def batch(self, a: int, b: int) -> list[Range] | WindowSlices:
        """Positions [a, b): row ranges in order, or with shuffle windows the windows' slices."""
        if not self.window:
            return self.ranges(a, b)
        w, parts = self.window, []
        for j in range(a // w, (b - 1) // w + 1):
            lo, hi = j * w, min((j + 1) * w, self.total)
            keep = frozenset(self.rgs[bisect.bisect_right(self.cum, lo) - 1:bisect.bisect_left(self.cum, hi)])
            _, rows, ranges, perm = self._window_rows(j)
            parts.append((j, rows, ranges, perm, keep, max(a, lo) - lo, min(b, hi) - lo))
        return WindowSlices(parts)
