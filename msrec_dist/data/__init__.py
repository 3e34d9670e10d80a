"""Data layer: data.yaml config (schema), streaming Parquet reader → Batch, synthetic data.

Flow: `load_data_config(data.yaml)` → `DataConfig` (files, features, tables) →
`make_dataloader(cfg, cfg.train, ReaderConfig(...), rank, world_size, start_batch)` → `Batch`es
(msrec_dist.batch: the one type the reader builds and the model reads).
`scan_splits(cfg, reader.scan, rank, world_size)` checks every value of both splits before the
first step (data/scan.py), with the reader's own checks.
`synth.generate(...)` writes a demo data set with planted multi-scenario structure.

Names below are re-exported lazily so `python -m msrec_dist.data.synth` does not pay for
importing torch and torchrec (several seconds).
"""
import importlib

_EXPORTS = {
    "reader": ["FileIndex", "ParquetBatchDataset", "ReaderConfig", "count_rows", "make_dataloader", "validate_files"],
    "scan": ["scan_files", "scan_splits"],
    "schema": ["DataConfig", "DataError", "DenseFeature", "ScenarioSpec", "SparseFeature", "TableSpec", "TaskSpec",
               "load_data_config", "validate_file_schema"],
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)


def __getattr__(name: str):
    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(f"msrec_dist.data.{module}"), name)
    raise AttributeError(f"module 'msrec_dist.data' has no attribute {name!r}")
