"""Export a run: its checkpoint → DIR/model.pt2 (torch.export) + DIR/manifest.json (+ vocab/, ops).

    load_trained (serving/trained.py) ──tables: fp32 or int8 (serving/tables.py)──►
    ServingModule (serving/program.py) ──torch.export──► model.pt2
                                       ──AOTInductor (compile)──► model.aoti.pt2
    manifest.json: what a serving stack needs to call the program and to turn raw ids into rows

The directory is written under DIR.tmp-<pid> and renamed into place; an existing non-empty DIR is
refused unless `overwrite`, which moves it aside to DIR.replaced-<time> first (nothing written
before is lost). Where the program calls the C++ kernels (torch.ops.msrec.*), the extension is
copied beside it as msrec_ops.so: torch.ops.load_library(DIR/msrec_ops.so) registers the ops
without msrec_dist.

model.aoti.pt2 is the same program compiled ahead of time by AOTInductor for this CPU: its
elementwise ops fused, no Python between them (msrec at batch 4096 on this project's 2-core CPU:
9.1 → 5.7 ms a batch), at ~15-25 s of compile per export. predict uses it where present and
loadable, model.pt2 otherwise.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time

import torch

from msrec_dist.features import FeatureSpec
from msrec_dist.serving.program import ServingModule, export_program, input_names
from msrec_dist.serving.tables import Fp32Tables, Int8Tables
from msrec_dist.serving.trained import Trained, load_trained
from msrec_dist.typed_yaml import ConfigError, to_dict

MANIFEST, PROGRAM, COMPILED, OPS_LIBRARY = "manifest.json", "model.pt2", "model.aoti.pt2", "msrec_ops.so"
FORMAT_VERSION = 1


def build_serving_module(trained: Trained, quantize: str | None) -> ServingModule:
    """The trained network over fp32 tables, or int8 row-wise ones (`quantize="int8"`)."""
    features = trained.features
    ebc = trained.model.embedding.ebc
    table_names = [t.name for t in features.tables()]
    weights = [ebc.embedding_bags[name].weight for name in table_names]
    feature_tables = [table_names.index(f.table) for f in features.kjt_features()]
    cls = {None: Fp32Tables, "none": Fp32Tables, "int8": Int8Tables}[quantize]
    module = ServingModule(trained.model, cls(weights, feature_tables, features.kjt_keys), features)
    for p in module.parameters():
        p.requires_grad_(False)  # the program computes no gradients; its outputs carry none
    return module


def id_mapping(features: FeatureSpec, data_yaml: str, out_dir: str) -> dict:
    """Per table, how raw ids become rows: a vocabulary copied into out_dir/vocab (the converters'
    vocab/<table>.parquet: columns raw, index; unknown ids → the OOV row), the hash
    (data/hashing.py), or none (the data already holds rows)."""
    vocab_dir = os.path.join(os.path.dirname(os.path.abspath(data_yaml)), "vocab")
    out: dict = {}
    for table in features.tables():
        feats = [f for f in features.sparse if f.table == table.name]
        entry: dict = {"features": table.feature_names, "rows": table.num_embeddings, "dim": table.dim}
        src = os.path.join(vocab_dir, f"{table.name}.parquet")
        if feats[0].hash_buckets is not None:
            entry["ids"] = {"kind": "hash", "buckets": feats[0].hash_buckets,
                            "int": "splitmix64(id + 0x6D73726563446973) mod buckets",
                            "string": "blake2b(utf8, digest_size=8, key=b'msrec_dist.hash_buckets.v1') "
                                      "as little-endian uint64 mod buckets"}
        elif os.path.exists(src):
            os.makedirs(os.path.join(out_dir, "vocab"), exist_ok=True)
            shutil.copy2(src, os.path.join(out_dir, "vocab", f"{table.name}.parquet"))
            entry["ids"] = {"kind": "vocab", "file": f"vocab/{table.name}.parquet", "columns": ["raw", "index"],
                            "unknown_row": feats[0].oov_id if feats[0].oov_id is not None else 0}
        else:
            entry["ids"] = {"kind": "rows", "note": "the data holds table rows 0..rows-1 as they are"}
        out[table.name] = entry
    return out


def _versions(quantize: str | None) -> dict:
    import torchrec

    out = {"msrec_dist": _package_version(), "torch": torch.__version__, "torchrec": torchrec.__version__,
           "python": platform.python_version()}
    if quantize == "int8":
        import fbgemm_gpu

        out["fbgemm_gpu"] = fbgemm_gpu.__version__
    return out


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("msrec_dist")
    except PackageNotFoundError:
        return "unknown"


def _ops_used(program: torch.export.ExportedProgram) -> list[str]:
    return sorted({str(n.target) for n in program.graph.nodes
                   if n.op == "call_function" and str(n.target).split(".")[0] in ("msrec", "fbgemm")})


def prepare_out_dir(out: str, overwrite: bool) -> None:
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; pass --overwrite to move it aside and export there")
        aside = f"{out}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(out, aside)
        print(f"moved the previous {out} to {aside}", file=sys.stderr, flush=True)
    elif os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"{out} exists and is not a directory")


def compile_program(program: torch.export.ExportedProgram, path: str) -> dict:
    """AOTInductor: the program compiled to a shared library for this machine's CPU, packaged at
    `path` (loaded by torch._inductor.aoti_load_package, torch alone). The ops it calls outside
    torch (torch.ops.msrec.*, fbgemm's) run through their registered kernels, as in model.pt2."""
    t0 = time.perf_counter()
    torch._inductor.aoti_compile_and_package(program, package_path=path)
    return {"file": os.path.basename(path), "by": "AOTInductor", "compile_s": round(time.perf_counter() - t0, 1),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}


def export_run(run_dir: str, out: str, which: str = "best", quantize: str | None = None,
               kernels: str | None = None, overwrite: bool = False, compile: bool = True) -> dict:
    """Write out/model.pt2 (+ out/model.aoti.pt2 with `compile`) and out/manifest.json for the
    run's checkpoint `which`; returns the manifest."""
    if quantize not in (None, "none", "int8"):
        raise ConfigError(f"--quantize must be int8 (or left out), got {quantize!r}")
    out = os.path.abspath(out)
    prepare_out_dir(out, overwrite)
    trained = load_trained(run_dir, which, kernels)  # type: ignore[arg-type]
    module = build_serving_module(trained, quantize)
    features = trained.features
    program = export_program(module, features)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        torch.export.save(program, os.path.join(tmp, PROGRAM))
        ops = _ops_used(program)
        load = ["import torch"]
        if any(op.startswith("fbgemm.") for op in ops):
            load.append("import fbgemm_gpu  # registers torch.ops.fbgemm (the int8 tables' kernel)")
        if any(op.startswith("msrec.") for op in ops):
            from msrec_dist.kernels import native

            shutil.copy2(native.extension_path(), os.path.join(tmp, OPS_LIBRARY))
            load.append(f"torch.ops.load_library('<DIR>/{OPS_LIBRARY}')  # the C++ kernels torch.ops.msrec.*")
        load.append(f"program = torch.export.load('<DIR>/{PROGRAM}').module()")
        compiled = compile_program(program, os.path.join(tmp, COMPILED)) if compile else None
        if compiled is not None:
            load.append(f"program = torch._inductor.aoti_load_package('<DIR>/{COMPILED}')  # or: compiled for "
                        "this CPU, the same outputs, faster")
        tables = id_mapping(features, trained.cfg.data, tmp)
        fp32_bytes, exported_bytes = module.tables.fp32_bytes, module.tables.table_bytes
        names = input_names(features)
        manifest = {
            "format": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "run_dir": os.path.abspath(run_dir),
            "checkpoint": {"which": which, "path": trained.checkpoint, "step": trained.step,
                           **trained.selection},
            "model": {"name": trained.cfg.model.name, "arch": trained.cfg.model.arch,
                      "kernels": trained.cfg.model.kernels},
            "quantize": quantize if quantize == "int8" else None,
            "inputs": [{"name": n, "dtype": "float32" if n == "dense" else "int64",
                        "shape": _input_shape(n, features)} for n in names],
            "outputs": {"name": "probs", "dtype": "float32", "shape": ["B", len(features.task_names)],
                        "columns": features.task_names},
            "feature_order": features.kjt_keys,
            "tasks": features.task_names,
            "scenarios": features.scenario.names,
            "data": to_dict(features),  # the features part of the training data.yaml, as parsed
            "tables": tables,
            "table_bytes": {"fp32": fp32_bytes, "exported": exported_bytes,
                            "ratio": round(fp32_bytes / exported_bytes, 4)},
            "ops": ops,
            "compiled": compiled,  # null: model.pt2 only (--no-compile)
            "load": load,
            "versions": _versions(quantize),
        }
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, out)  # onto an empty directory too (prepare_out_dir refused a non-empty one)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _input_shape(name: str, features: FeatureSpec) -> list:
    if name == "dense":
        return ["B", features.dense_width]
    if name.endswith(".values"):
        return [f"N_{name.removesuffix('.values')}"]
    return ["B"]

