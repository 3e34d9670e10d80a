#!/usr/bin/env bash
# The GPU checks, in one call on a lent GPU machine (torch + triton there, no torchrec, no network):
#   1. the environment (GPU, driver, torch, triton);
#   2. python -m benchmarks.kernels: Triton vs eager / torch.compile / SDPA at product shapes,
#      autotuned, each path's output checked against eager; the targets evaluated;
#   3. tests/kernels/test_cuda.py: the compiled kernels against a float64 reference over odd
#      shapes, fp32 / bf16 / fp16, with NaN-poisoned outputs (one config per key, see kernels/tuning.py).
# Everything lands in $OUT (default benchmarks/results/gpu); step 2 writes its report after every
# shape, and each step has a time limit, so a run cut short keeps what it measured.
#   device run:   bash benchmarks/gpu_check.sh       (then copy $OUT's files to benchmarks/results/)
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
# setup.py installs kernels/ as msrec_dist.kernels (package_dir); without installing, a link does it
[ -e msrec_dist/kernels ] || ln -s ../kernels msrec_dist/kernels
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} 2>&1 | tee "$OUT/env.txt"
timeout "${BENCH_S:-330}" python3 -m benchmarks.kernels --out "$OUT" --budget-s "${BUDGET_S:-230}" 2>&1 | tee "$OUT/bench.log"
MSREC_TRITON_AUTOTUNE=0 timeout "${PARITY_S:-170}" python3 -m pytest --noconftest -p no:cacheprovider -v -s \
  tests/kernels/test_cuda.py 2>&1 | tee "$OUT/parity.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|Error" | tail -40
