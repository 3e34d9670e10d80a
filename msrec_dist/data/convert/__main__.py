"""python -m msrec_dist.data.convert NAME --src RAW_DIR --out OUT_DIR [--dim D] [--shards K] [options]

NAME is a module of this package that defines `add_arguments(parser)` (its own options) and
`run(args, command) -> data.yaml path` (found automatically: a new converter needs no entry here).
`python -m msrec_dist.data.convert NAME --help` lists a converter's options.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import shlex
import sys

import msrec_dist.data.convert as package
from msrec_dist.data.convert.common import ConvertError


def converters() -> dict[str, object]:
    out = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name == "common":
            continue
        mod = importlib.import_module(f"{package.__name__}.{info.name}")
        if hasattr(mod, "run") and hasattr(mod, "add_arguments"):
            out[info.name] = mod
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    mods = converters()
    ap = argparse.ArgumentParser(prog="python -m msrec_dist.data.convert", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="name", required=True, metavar="NAME")
    for name, mod in sorted(mods.items()):
        p = sub.add_parser(name, help=(mod.__doc__ or "").split("\n")[0], description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--src", required=True, help="directory of the raw (unzipped) files")
        p.add_argument("--out", required=True, help="output directory (data.yaml, train/, val/, eval/, vocab/, README.md)")
        p.add_argument("--dim", type=int, default=16, help="embedding dim of every table")
        p.add_argument("--shards", type=int, default=1, help="Parquet files per split")
        mod.add_arguments(p)
    a = ap.parse_args(argv)
    command = "python -m msrec_dist.data.convert " + " ".join(shlex.quote(x) for x in argv)
    try:
        path = mods[a.name].run(a, command)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
