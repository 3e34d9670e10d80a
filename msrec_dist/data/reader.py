"""Streaming Parquet reader: files → validated numpy row groups → `Batch` via a DataLoader.

Flow: `make_dataloader` checks every file's schema and row counts up front from metadata
(`validate_files` → `FileIndex`), then wraps a `ParquetBatchDataset` in a
`DataLoader(batch_size=None)`. Each worker turns its plan (lists of global row ranges, one
list per batch) into `Batch`es: ranges → (file, row group) pieces → the row group is read
with only the needed columns, validated and converted to numpy once (`Chunk`, cached: the
last one per worker) → pieces are sliced and concatenated → tensors.

Global row order: files in the given (sorted) order, rows in file order. Split modes:
  interleave: global batch k = rows [k*GB, (k+1)*GB), GB = batch_size * world_size; rank r
      takes the r-th slice of batch_size rows; worker w of W takes the k with
      (k - start_batch) % W == w, so the DataLoader's round-robin yields batches in k order.
  files: file i goes to part i % (world*W); part rank*W + w streams its files in batches
      of batch_size rows (a batch may span files). `start_batch` = batches this rank's
      loader already yielded (exact resume only with the same world size and workers;
      parts are rotated over workers so the resumed round-robin continues the old order).
Shuffle (`reader.shuffle`, training only: make_dataloader's `epoch` given; eval, val and the scan
read in file order): epoch e's global row order is a pure function of (run.seed, e) (`EpochOrder`):
the row groups permuted, then each window of `reader.shuffle_buffer` consecutive rows of that
order permuted (window j by its own seeded generator). The splits then cut that order instead of
the file order: interleave: global batch k = positions [k*GB, (k+1)*GB) of the epoch's order,
sliced per rank and dealt to workers as above, so every row is read once per epoch over all ranks
and workers, and `start_batch` resumes at position start_batch*GB of the same order, exactly.
files: each part's row groups (and windows) get their own seeded order (seed, epoch, part); resume
is as exact as before (same world size and workers). With windows, a worker gathers each window it
reads from once, in the window's order (`_RowReader._window_chunk`); its batches are slices of it.
Memory: one decoded row group per worker plus the batch being built; shuffled with windows: the
decoded row groups of the current window and the window gathered (about 2 x shuffle_buffer rows).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msrec_dist.batch import Batch
from msrec_dist.data.decode import Chunk, decode, take_window
from msrec_dist.data.order import EpochOrder, Range, WindowSlices
from msrec_dist.data.read_ahead import read_ahead
from msrec_dist.data.schema import DataConfig, DataError, ReaderConfig, open_parquet, validate_file_schema
from msrec_dist.runtime import allowed_cores

@dataclass
class FileIndex:
    """Row layout of the file list, from Parquet metadata only."""

    files: list[str]
    rows: list[int]  # rows per file
    rg_starts: list[list[int]]  # per file: first row of each row group, then the file's row count

    @property
    def starts(self) -> list[int]:  # [F + 1] global row of each file's first row, then the total
        return [0, *np.cumsum(self.rows, dtype=np.int64).tolist()]

    @property
    def total(self) -> int:
        return int(sum(self.rows))


def validate_files(cfg: DataConfig, files: list[str]) -> FileIndex:
    """Check every file's schema and non-emptiness (metadata only); return the row layout."""
    rows, rg_starts = [], []
    for path in files:
        pf = open_parquet(path)
        validate_file_schema(path, cfg, pf.schema_arrow)
        md = pf.metadata
        if md.num_rows == 0:
            raise DataError(f"{path}: empty shard (0 rows)")
        sizes = [md.row_group(j).num_rows for j in range(md.num_row_groups)]
        rows.append(md.num_rows)
        rg_starts.append([0, *np.cumsum(sizes).tolist()])
    return FileIndex(list(files), rows, rg_starts)


def count_rows(files: list[str]) -> int:
    """Total rows over `files` from Parquet metadata (no data read)."""
    return sum(open_parquet(f).metadata.num_rows for f in files)


_OPEN_FILES = 8  # ParquetFiles a row reader keeps open


class _RowReader:
    """Reads global row ranges into a Batch; caches the open file and the last row group."""

    def __init__(self, cfg: DataConfig, index: FileIndex):
        self.cfg, self.index = cfg, index
        self.starts = index.starts
        self.columns = cfg.columns()
        self.kjt_keys = cfg.kjt_keys  # once, not per batch
        # Open files by index, the last few: a shuffle window spans row groups of several files,
        # and reopening one (footer read, schema check) per row group cost 5% of a shuffled read.
        self._files: dict[int, object] = {}
        self._chunk: tuple[int, int, Chunk] | None = None  # (file index, row group, chunk)
        self.rg_of = [(f, g) for f, s in enumerate(index.rg_starts) for g in range(len(s) - 1)]  # global id → (file, group)
        self.gstarts = _rg_starts(index)
        self.gstarts_list = self.gstarts.tolist()
        self._kept: dict[int, Chunk] = {}  # shuffled reads: decoded row groups of the current window
        self._window: tuple[int, Chunk] | None = None  # (j, window j gathered in its order)

    def _get_chunk(self, f: int, g: int) -> Chunk:
        if self._chunk is not None and self._chunk[:2] == (f, g):
            return self._chunk[2]
        path = self.index.files[f]
        if f not in self._files:
            pf = open_parquet(path)
            validate_file_schema(path, self.cfg, pf.schema_arrow)
            if len(self._files) >= _OPEN_FILES:
                del self._files[next(iter(self._files))]  # the oldest opened
            self._files[f] = pf
        try:
            # One decode thread: the reader runs beside the train step, whose threads hold the
            # cores; arrow's pool on top of them made a row group slower, not faster (16384 rows
            # of the benchmarks' synthetic data on this project's 2-core machine: 4.4 ms with the
            # pool, 2.9 ms on one thread, 2.5 ms with the column chunks pre-buffered too).
            table = self._files[f].read_row_group(g, columns=self.columns, use_threads=False)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read row group {g}: {e}") from e
        chunk = decode(table, self.cfg, path, self.index.rg_starts[f][g])
        self._chunk = (f, g, chunk)
        return chunk

    def _pieces(self, ranges: list[Range]) -> Iterator[tuple[Chunk, int, int, int]]:
        """(chunk, lo, hi, global row of lo) for each row-group piece of `ranges`."""
        for a, b in ranges:
            while a < b:
                f = bisect.bisect_right(self.starts, a) - 1
                local = a - self.starts[f]
                rgs = self.index.rg_starts[f]
                g = bisect.bisect_right(rgs, local) - 1
                hi = min(b - self.starts[f], rgs[g + 1])
                yield self._get_chunk(f, g), local - rgs[g], hi - rgs[g], a
                a += hi - local

    def _window_chunk(self, ranges: list[Range], perm: np.ndarray, keep: frozenset[int]) -> Chunk:
        """A shuffle window in its order: the rows of `ranges` (the window before its permutation;
        their row groups decoded, those shared with the previous window kept) gathered once by
        `perm` straight from the row groups."""
        for r in [r for r in self._kept if r not in keep]:
            del self._kept[r]
        parts = []
        for a, b in ranges:
            while a < b:
                r = bisect.bisect_right(self.gstarts_list, a) - 1
                e = min(b, self.gstarts_list[r + 1])
                if r not in self._kept:
                    self._kept[r] = self._get_chunk(*self.rg_of[r])
                parts.append((self._kept[r], a - self.gstarts_list[r], e - self.gstarts_list[r]))
                a = e
        return take_window(parts, perm)

    def _row_pieces(self, batch: WindowSlices) -> Iterator[tuple[Chunk, int, int, np.ndarray]]:
        """(window chunk, lo, hi, global rows of lo:hi) per shuffle window the batch lies in."""
        for j, rows, ranges, perm, keep, lo, hi in batch.parts:
            if self._window is None or self._window[0] != j:
                self._window = None  # the old window's memory goes first
                self._window = (j, self._window_chunk(ranges, perm, keep))
            yield self._window[1], lo, hi, rows[lo:hi]

    def read(self, ranges: list[Range] | WindowSlices) -> Batch:
        # Runs once per batch, in the read-ahead thread beside the train step or inline between
        # steps (read_ahead_in_thread), on the trainer's cores either way, so it copies each
        # array once: the KJT's values and lengths into one buffer each; dense, labels and
        # scenario are views of the decoded row group when the batch lies in one (the usual
        # case: batches are row-group aligned), else one concatenation.
        pieces = list(self._row_pieces(ranges) if isinstance(ranges, WindowSlices) else self._pieces(ranges))
        nk = len(self.kjt_keys)
        sparse = KeyedJaggedTensor(
            keys=self.kjt_keys,
            values=torch.from_numpy(np.concatenate([c.values[k][c.offsets[k][lo]:c.offsets[k][hi]]
                                                    for k in range(nk) for c, lo, hi, _ in pieces])),  # [nnz] int64
            lengths=torch.from_numpy(np.concatenate([c.lengths[k][lo:hi]
                                                     for k in range(nk) for c, lo, hi, _ in pieces])),  # [F * B] int32
        )

        def rows_of(name: str) -> torch.Tensor:
            parts = [getattr(c, name)[lo:hi] for c, lo, hi, _ in pieces]
            return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))

        return Batch(
            sparse=sparse, dense=rows_of("dense"), labels=rows_of("labels"), scenario=rows_of("scenario"),
            rows=torch.cat([torch.from_numpy(g) if isinstance(g, np.ndarray) else torch.arange(g, g + hi - lo)
                            for _, lo, hi, g in pieces]),
        )


def _round_robin_taken(counts: list[int], n: int) -> tuple[list[int], int]:
    """DataLoader order is round-robin over workers, skipping exhausted ones: return how many of
    each worker's batches are among the first n yielded, and the worker whose batch is next."""
    taken, nxt = [0] * len(counts), 0
    while n > 0 and any(t < c for t, c in zip(taken, counts)):
        for w, c in enumerate(counts):
            if n > 0 and taken[w] < c:
                taken[w] += 1
                n -= 1
                nxt = (w + 1) % len(counts)
    return taken, nxt


def _rg_starts(index: FileIndex) -> np.ndarray:
    """[R + 1] int64: global row of each row group's first row (files in order), then the total."""
    starts = index.starts
    return np.array([starts[f] + s for f, rgs in enumerate(index.rg_starts) for s in rgs[:-1]] + [index.total],
                    np.int64)


class ParquetBatchDataset(IterableDataset):
    """Yields this rank's `Batch`es; see the module docstring for the split modes and the shuffle."""

    def __init__(self, cfg: DataConfig, index: FileIndex, reader: ReaderConfig, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0, epoch: int | None = None, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.cfg, self.index, self.reader = cfg, index, reader
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.num_workers = max(1, reader.num_workers)
        self.epoch, self.seed = epoch, seed
        self.shuffled = reader.shuffle and epoch is not None  # training only
        self.gstarts = _rg_starts(index)

    def _order(self, rgs: list[int], part: int) -> EpochOrder:
        """The epoch's order of `rgs`; `part` 0 = the whole data (interleave), 1 + p = files-mode part p."""
        key = (self.seed % 2**63, self.epoch, part) if self.shuffled else None
        return EpochOrder(rgs, self.gstarts, key, self.reader.shuffle_buffer)

    def _interleave(self, w: int) -> Iterator[list[Range] | WindowSlices]:
        b, n = self.reader.batch_size, self.index.total
        gb = b * self.world_size
        order = self._order(list(range(len(self.gstarts) - 1)), 0)
        for k in range(self.start_batch + w, math.ceil(n / gb), self.num_workers):
            a = k * gb + self.rank * b
            if a < n:
                yield order.batch(a, min(a + b, n))

    def _part(self, w: int) -> EpochOrder:
        """The epoch's order of files-mode part rank*W + w (its files' row groups)."""
        parts, p = self.world_size * self.num_workers, self.rank * self.num_workers + w
        first = np.cumsum([0] + [len(s) - 1 for s in self.index.rg_starts]).tolist()  # per file: first global row group
        rgs = [r for i in range(len(self.index.files)) if i % parts == p for r in range(first[i], first[i + 1])]
        return self._order(rgs, 1 + p)

    def _files_counts(self) -> tuple[list[int], list[int], int]:
        counts = [math.ceil(self._part(w).total / self.reader.batch_size) for w in range(self.num_workers)]
        return counts, *_round_robin_taken(counts, self.start_batch)

    def plan(self, w: int) -> Iterator[list[Range] | WindowSlices]:
        """What worker `w` reads, one item per batch: global row ranges, or a shuffled batch's rows."""
        if self.reader.split == "interleave":
            yield from self._interleave(w)
            return
        # a resumed loader starts its round-robin at worker 0: rotate parts so that worker 0
        # continues the part whose batch was next, which keeps the original order exactly
        _, taken, nxt = self._files_counts()
        part = (w + nxt) % self.num_workers
        order, b = self._part(part), self.reader.batch_size
        for i in range(taken[part], math.ceil(order.total / b)):
            yield order.batch(i * b, min((i + 1) * b, order.total))

    def __len__(self) -> int:
        """Number of batches this rank yields (from `start_batch` on)."""
        if self.reader.split == "interleave":
            n, gb = self.index.total, self.reader.batch_size * self.world_size
            a0 = self.rank * self.reader.batch_size
            return sum(1 for k in range(self.start_batch, math.ceil(n / gb)) if k * gb + a0 < n)
        counts, taken, _ = self._files_counts()
        return sum(counts) - sum(taken)

    def __iter__(self) -> Iterator[Batch | _Failure]:
        info = get_worker_info()
        w = 0 if info is None else info.id
        if info is not None and info.num_workers != self.num_workers:
            raise RuntimeError(f"dataset planned for {self.num_workers} workers, run by {info.num_workers}")
        reader = _RowReader(self.cfg, self.index)
        try:
            for ranges in self.plan(w):
                yield reader.read(ranges)
        except DataError as e:
            # handed to the main process as an item: a worker that raises is slow to shut down
            # (torch waits 5 s for it) and torch would wrap the message
            yield _Failure(str(e))


@dataclass
class _Failure:
    """A DataError raised in a worker, re-raised by `_Loader` in the main process."""

    message: str


class _Loader(DataLoader):
    """DataLoader that re-raises worker DataErrors with their original message; with no workers
    and a read-ahead depth (make_dataloader: read_ahead_in_thread), it reads that many batches
    ahead in a background thread."""

    def __init__(self, *args, read_ahead_depth: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read_ahead_depth = read_ahead_depth  # batches read ahead by a thread; 0 = none

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        # Without workers the dataset is iterated directly: DataLoader's single-process iterator
        # adds a fetcher, a profiler range and a pin-memory check per batch (~0.04 ms, a tenth of
        # the reader's whole per-batch cost) and nothing this batch_size=None loader uses.
        if self.num_workers == 0:
            items = iter(self.dataset)
            if self.read_ahead_depth > 0:
                items = read_ahead(items, self.read_ahead_depth)
            yield from _raising_failures(items)
            return
        workers = super().__iter__()
        try:
            yield from _raising_failures(workers)
        finally:
            # a worker iterator left to the garbage collector shuts its workers down only then and
            # waits 5 s for each (torch's MP_STATUS_CHECK_INTERVAL); now it takes ~10 ms
            shutdown = getattr(workers, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def _raising_failures(items: Iterator) -> Iterator[Batch]:
    """`items`, with a worker's _Failure raised here as the DataError it was."""
    for item in items:
        if isinstance(item, _Failure):
            raise DataError(item.message)
        yield item


def read_ahead_in_thread(setting: bool | str, device_type: str, usable_cores: int, step_threads: int,
                         world_size: int = 1) -> bool:
    """Whether the in-process reader decodes in a read-ahead thread (`reader.prefetch_thread`).

    'auto': only where the thread has CPU time to itself: the step runs on an accelerator (the
    host threads mostly wait for it), the process may use more cores than the step's intra-op
    threads, or the world has several ranks (each step waits for the others in its collectives,
    and the thread decodes meanwhile). A single CPU process whose OpenMP threads fill every core
    reads inline: there the thread only takes turns with them (an OpenMP parallel op waits for its
    slowest thread, so every slice the decode takes from one of them stalls both, and the thread
    contends for the GIL), and inline costs the decode itself, nothing more. Measured on a 2-core
    machine (benchmarks/results/reader_throughput.md; README, Performance): 1 rank, ple step-time
    overhead +4.4% inline vs +7.2% with the thread; 2 ranks bound to a core each, the thread ~2%
    faster at B=8192 and even at 512-1024.
    """
    if setting != "auto":
        return bool(setting)
    return device_type != "cpu" or usable_cores > step_threads or world_size > 1


def make_dataloader(cfg: DataConfig, files: list[str], reader: ReaderConfig, rank: int = 0,
                    world_size: int = 1, start_batch: int = 0, device_type: str = "cpu",
                    epoch: int | None = None, seed: int = 0) -> DataLoader:
    """DataLoader yielding this rank's `Batch`es; file problems raise DataError right here.
    `device_type`: where the train step runs ('auto' read-ahead thread, read_ahead_in_thread).
    `epoch`, `seed`: the training epoch and run.seed, whose order the loader yields when
    `reader.shuffle`; epoch None (eval, val, step counts): file order."""
    reader.validate("reader")
    index = validate_files(cfg, files)
    ds = ParquetBatchDataset(cfg, index, reader, rank, world_size, start_batch, epoch, seed)
    extra = {"prefetch_factor": reader.prefetch_factor} if reader.num_workers > 0 else {}
    in_thread = reader.num_workers == 0 and read_ahead_in_thread(reader.prefetch_thread, device_type, len(allowed_cores()),
                                                                 torch.get_num_threads(), world_size)
    ahead = reader.prefetch_factor if in_thread else 0
    return _Loader(ds, batch_size=None, num_workers=reader.num_workers, persistent_workers=False,
                   read_ahead_depth=ahead, **extra)
