"""Builds the C++ extension msrec_dist._C; everything else about the package (metadata,
dependencies, packages, the `kernels/` → `msrec_dist.kernels` mapping, console scripts) is in
pyproject.toml.

The C++ ops in csrc/*.cpp are built into the torch extension `msrec_dist._C` when
MSREC_BUILD_CSRC=1 (`MSREC_BUILD_CSRC=1 pip install --no-deps --no-build-isolation -e .`, as
`make setup` does; the editable install puts the .so next to msrec_dist/__init__.py). Without it
nothing is compiled and msrec_dist/data/native.py uses its numpy fallbacks. See csrc/README.md."""
import glob
import os

from setuptools import setup


def _extensions():
    """Torch C++ extensions from csrc/*.cpp; built only on request (about 1 min per file)."""
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources or os.environ.get("MSREC_BUILD_CSRC") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # One .so for all ops; each .cpp registers its ops (TORCH_LIBRARY_FRAGMENT(msrec, ...)) and
    # check_ids.cpp defines the module init, so `import msrec_dist._C` loads them.
    # -fopenmp: at::parallel_for is an OpenMP pragma in the ATen headers; the .so then links
    # libgomp.so.1, which resolves to the copy torch has already loaded (import torch first).
    # -fno-trapping-math: lets GCC turn the kernels' float compares and selects (softmax max,
    # masks, the clamps of field_attention's vectorized exp) into blends, so those loops
    # vectorize; the math is unchanged (IEEE results; no FP traps are enabled anywhere).
    ext = CppExtension("msrec_dist._C", sources, extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math"],
                       extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
