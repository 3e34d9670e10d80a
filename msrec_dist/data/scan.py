"""Value scan of every split before the first train step (`reader.scan: true`).

The reader checks values only when it decodes a row group (data/reader.py `_decode`): a bad id
in the eval (or val) split would stop the run after all of training, with nothing saved; a bad value late
in the train split, mid-epoch. `scan_splits` reads every row group of the train, eval and val files
once, before the model is built, through the reader's own row-group path (`_RowReader`: the
same read and the same `_decode` checks: ids in range via `first_bad_id`, labels 0/1 and
non-null, scenario in range, dense finite and non-null, vectors of their dim and finite, no
null ids inside lists), so one piece
of code holds the rules and the errors read the same: file, column and row.

Streaming: one decoded row group at a time. Several ranks split the files (file i to rank
i % world) and agree through `gather` (an all-gather of each rank's first error, or None): any
rank's error stops every rank with the same message. Cost against one epoch's read:
benchmarks/results/reader_scan.md. `reader.scan: false` skips it (huge data); the reader still
checks each row group as it decodes it.
"""
from __future__ import annotations

from typing import Callable, Optional

from msrec_dist.data.reader import _RowReader, validate_files
from msrec_dist.data.schema import DataConfig, DataError

Gather = Callable[[Optional[str]], list]  # this rank's error (or None) -> every rank's, in rank order


def scan_files(cfg: DataConfig, files: list[str]) -> int:
    """Check every value of `files` (schema, then each row group); raises DataError at the first
    bad value (file, column, row). Returns the rows checked."""
    if not files:
        return 0
    index = validate_files(cfg, files)
    reader = _RowReader(cfg, index)
    for f in range(len(files)):
        for g in range(len(index.rg_starts[f]) - 1):
            reader._get_chunk(f, g)  # reads and decodes with the reader's checks; raises on a bad value
    return index.total


def _all_gather(obj: Optional[str]) -> list:
    import torch.distributed as dist  # only for a world of several ranks

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def scan_splits(cfg: DataConfig, enabled: bool, rank: int = 0, world_size: int = 1,
                gather: Optional[Gather] = None) -> int:
    """`reader.scan`: if enabled, check the values of the train, eval and val files (this rank's
    share: files i % world_size == rank) before training; every rank raises the same DataError
    if any rank found a bad value. Returns the rows this rank checked (0 if disabled)."""
    if not enabled:
        return 0
    files = list(dict.fromkeys([*cfg.train, *cfg.eval, *cfg.val]))  # a file in several splits once
    mine = [f for i, f in enumerate(files) if i % world_size == rank]
    error, rows = None, 0
    try:
        rows = scan_files(cfg, mine)
    except DataError as e:
        error = str(e)
    if world_size > 1:
        errors = (gather or _all_gather)(error)
        first = next(((r, m) for r, m in enumerate(errors) if m is not None), None)
        if first is not None:
            raise DataError(f"rank {first[0]}: {first[1]}")
    elif error is not None:
        raise DataError(error)
    return rows
