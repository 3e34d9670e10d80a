"""Tests of msrec_dist/model: the blocks, the zoo and what the model imports."""
