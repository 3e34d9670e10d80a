"""Hashed ids (`hash_buckets: N` on a sparse feature): raw ids → rows 0..N-1, the same everywhere.

    int ids     (any integer type, taken as int64)  row = splitmix64(id + SEED) mod N
    string ids  (UTF-8)                             row = blake2b(utf8, digest_size=8, key=KEY) as
                                                          little-endian uint64, mod N

Both are fixed functions of the value alone: no Python `hash()` (salted per process by
PYTHONHASHSEED), no dependence on the process, the machine or the order of the data, so every
rank, every resume and every later run maps an id to the same row (tests/data/test_features_contract.py
checks this in a fresh process). splitmix64 is Steele, Lea & Flood's 64-bit finaliser (the one of
Java's SplittableRandom), vectorised over the column in numpy. Strings are hashed once per
distinct value: the column is dictionary-encoded by Arrow, the dictionary's values hashed with
hashlib's blake2b, and the indices take their hash. Changing SEED or KEY re-maps every id
(a trained table would no longer match its data).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SEED = np.uint64(0x6D73726563446973)  # fixed: b"msrecDis"
KEY = b"msrec_dist.hash_buckets.v1"  # fixed blake2b key for string ids

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """uint64 [n] → uint64 [n]: splitmix64's mix of x (wrapping uint64 arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_int64(values: np.ndarray) -> np.ndarray:
    """int ids [n] → uint64 hashes [n]."""
    with np.errstate(over="ignore"):
        return splitmix64(values.astype(np.int64, copy=False).view(np.uint64) + SEED)


def hash_strings(values: list[str]) -> np.ndarray:
    """strings [n] → uint64 hashes [n] (blake2b of the UTF-8 bytes, keyed)."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(v.encode("utf-8"), digest_size=8, key=KEY).digest(), "little")
                        for v in values), dtype=np.uint64, count=len(values))


def is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def hash_ids(arr: pa.Array, buckets: int) -> np.ndarray:
    """A flat Arrow array of ids without nulls (integer or string) → int64 rows in 0..buckets-1."""
    if is_string(arr.type):
        enc = pc.dictionary_encode(arr)
        uniques = hash_strings(enc.dictionary.to_pylist())
        h = uniques[enc.indices.to_numpy(zero_copy_only=False)]
    else:
        h = hash_int64(arr.to_numpy(zero_copy_only=False))
    return (h % np.uint64(buckets)).astype(np.int64)
