"""Converters from public raw data sets to this project's Parquet + data.yaml layout.

`python -m msrec_dist.data.convert NAME --src RAW_DIR --out OUT_DIR [options]`; the shared writing
step (vocabularies, shards, data.yaml with train/val/eval, README.md) is `common.write_dataset`.
Nothing is downloaded: each converter's docstring says where its raw files are obtained.
"""
