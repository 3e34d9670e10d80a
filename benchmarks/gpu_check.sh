#!/usr/bin/env bash
# The GPU checks, in one call on a lent GPU machine (torch + triton there, no torchrec, no network):
#   1. the environment (GPU, driver, torch, triton);
#   2. python -m benchmarks.kernels: Triton vs eager / torch.compile / SDPA at product shapes,
#      autotuned, each path's output checked against eager; the targets evaluated;
#   3. tests/kernels/test_cuda.py: the compiled kernels against a float64 reference over odd
#      shapes, fp32 / bf16 / fp16, with NaN-poisoned outputs (one config per key, see kernels/tuning.py),
#      in three pytest processes side by side on the one GPU (the two largest attention shapes; the
#      other attention cases; everything else), each with its own log, then joined in parity.log.
# OPS picks the benchmark's ops (default all: gate_combine field_attention gate_combine_relu).
# Everything lands in $OUT (default benchmarks/results/gpu); step 2 writes its report after every
# shape, and each step has a time limit, so a run cut short keeps what it measured.
#   device run:   bash benchmarks/gpu_check.sh       (then copy $OUT's files to benchmarks/results/)
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
# the install maps kernels/ to msrec_dist.kernels (pyproject package-dir); without installing, a link does it
[ -e msrec_dist/kernels ] || ln -s ../kernels msrec_dist/kernels
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
} 2>&1 | tee "$OUT/env.txt"
# shellcheck disable=SC2086  # OPS is a list of words
timeout "${BENCH_S:-330}" python3 -m benchmarks.kernels --out "$OUT" --budget-s "${BUDGET_S:-230}" \
  --ops ${OPS:-gate_combine field_attention gate_combine_relu} 2>&1 | tee "$OUT/bench.log"
BIG="513-2-128-128 or 257-1-100-72"
i=0
for group in "$BIG" "test_field_attention_gpu and not ($BIG)" "not test_field_attention_gpu"; do
  i=$((i + 1))
  MSREC_TRITON_AUTOTUNE=0 timeout "${PARITY_S:-200}" python3 -m pytest --noconftest -p no:cacheprovider -v -s \
    -rfEs -k "$group" tests/kernels/test_cuda.py >"$OUT/parity_$i.log" 2>&1 &
done
wait
for f in "$OUT"/parity_[123].log; do echo "== $f"; cat "$f"; done >"$OUT/parity.log"
rm -f "$OUT"/parity_[123].log
grep -E "FAILED|ERROR|SKIPPED| passed| failed|^== " "$OUT/parity.log" | tail -60
