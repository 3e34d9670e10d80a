"""The multi-scenario multi-task model: its config (config.py), its blocks and the zoo (zoo.py).

It reads the feature specs (msrec_dist/features.py) and the Batch (msrec_dist/batch.py), and
imports nothing from msrec_dist.data, msrec_dist.distributed or msrec_dist.training.
"""
