// msrec::check_ids(Tensor values, int num_embeddings) -> int
//
// Index of the first id in `values` (1-D int32 or int64 CPU tensor, any stride) outside
// [0, num_embeddings), or -1 when all are in range. One pass, no temporaries: the Parquet
// reader (msrec_dist/data/native.py) calls it for every sparse column of every row group.
//
// Built into msrec_dist._C by setup.py (MSREC_BUILD_CSRC=1). The op lives in a
// TORCH_LIBRARY_FRAGMENT because kernels/ops.py also registers ops under the `msrec`
// namespace (torch.library.custom_op); a TORCH_LIBRARY block would claim the namespace.
// Loading: `import torch` then `import msrec_dist._C` (the empty module below; in the project
// only kernels/native.py does it), or torch.ops.load_library(path); one copy per process (a
// second registration aborts).

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

extern "C" {
// An empty Python module, so that `import msrec_dist._C` loads this .so and runs the static
// registrations below (the pattern of PyTorch's custom C++ op tutorial; it needs no pybind11).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "C++ ops of msrec_dist, registered as torch.ops.msrec.* on import",  // doc
      -1,  // per-interpreter state size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}

namespace msrec {
namespace {

constexpr int64_t kBlock = 1024;  // ids checked branch-free before looking for the first bad one

// For signed T and U its unsigned twin, with m = min(num_embeddings - 1, max of T) >= 0:
// id in [0, m]  <=>  the top bit of  U(id) | (U(m) - U(id))  is clear. A negative id has the top
// bit set; an id above m makes the difference wrap to >= 2^(bits-1). Only OR and SUB, so the
// block loop vectorizes on any x86-64 (SSE2 has no 64-bit compare).
template <typename T>
int64_t first_bad(const T* p, int64_t n, int64_t stride, int64_t num_embeddings) {
  using U = std::make_unsigned_t<T>;
  constexpr U kTop = U(1) << (sizeof(U) * 8 - 1);
  if (n == 0) return -1;
  if (num_embeddings <= 0) return 0;  // nothing is in range
  const U m = static_cast<U>(std::min<int64_t>(num_embeddings - 1, std::numeric_limits<T>::max()));
  auto bad = [m](T v) { return ((static_cast<U>(v) | (m - static_cast<U>(v))) & kTop) != 0; };
  int64_t i = 0;
  if (stride == 1) {
    for (; i + kBlock <= n; i += kBlock) {
      U acc = 0;
      for (int64_t k = 0; k < kBlock; ++k) {
        const U v = static_cast<U>(p[i + k]);
        acc |= v | (m - v);
      }
      if (acc & kTop) break;  // the first bad id is in this block: scan it below
    }
    for (; i < n; ++i) {
      if (bad(p[i])) return i;
    }
    return -1;
  }
  for (; i < n; ++i) {
    if (bad(p[i * stride])) return i;
  }
  return -1;
}

int64_t check_ids_cpu(const at::Tensor& values, int64_t num_embeddings) {
  TORCH_CHECK(values.dim() == 1, "msrec::check_ids: values must be 1-D, got ", values.dim(), "-D");
  const int64_t n = values.numel();
  const int64_t stride = values.stride(0);
  switch (values.scalar_type()) {
    case at::ScalarType::Int:
      return first_bad(values.const_data_ptr<int32_t>(), n, stride, num_embeddings);
    case at::ScalarType::Long:
      return first_bad(values.const_data_ptr<int64_t>(), n, stride, num_embeddings);
    default:
      TORCH_CHECK(false, "msrec::check_ids: values must be int32 or int64, got ", values.scalar_type());
  }
  return -1;  // not reached
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(msrec, m) {
  m.def("check_ids(Tensor values, int num_embeddings) -> int");
}

TORCH_LIBRARY_IMPL(msrec, CPU, m) {
  m.impl("check_ids", &check_ids_cpu);
}

}  // namespace msrec
