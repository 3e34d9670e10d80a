"""Batch lives in msrec_dist/batch.py (the reader builds it, the model reads it); re-exported here
for msrec_dist.data's lazy exports and older imports."""
from msrec_dist.batch import Batch

__all__ = ["Batch"]
