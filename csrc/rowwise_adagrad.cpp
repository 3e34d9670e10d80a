// msrec::rowwise_adagrad_dense_(Tensor(a!) weight, Tensor(b!) grad, Tensor(c!) momentum, float lr,
//                               float eps) -> int
//
// The replicated (data_parallel) tables' optimizer step (msrec_dist/distributed/replicated.py): exact
// row-wise Adagrad, fbgemm's EXACT_ROWWISE_ADAGRAD, on a dense table gradient, in one pass:
//
//     for every row r whose gradient grad[r, :] is not all zeros:
//         momentum[r] += mean_d grad[r, d]^2
//         weight[r, :] -= lr * grad[r, :] / (sqrt(momentum[r]) + eps)
//         grad[r, :] = 0
//
// and returns the number of rows it updated. weight, grad [rows, D] and momentum [rows] are
// contiguous CPU tensors of one floating dtype. A row whose gradient is all zeros (no rank's batch
// looked it up) is left as the full-table update would leave it (w - lr·0 = w, m + 0 = m), so
// skipping it changes nothing; -0.0 counts as nonzero here, which is equally harmless. The
// gradient is zeroed on the rows it updated, so every gradient row is zero afterwards: a caller
// that keeps the gradient tensor for the next backward need not zero it (DenseStep instead drops
// it, msrec_dist/distributed/grad_sync.py).
//
// Why by hand: in torch the same update is 5 passes over every row of the table (square, mean,
// sqrt, addcdiv, and the zeroing after it), whatever the batch touched: about 1 ms a step for the
// demo's 15k rows on this project's CPU, most of the gap between 2 ranks at global batch 512 and
// one; and finding the touched rows first costs as much again in torch (ne/any/nonzero: ~0.2 ms
// per 10k x 16 table on one core). Here each row is read once, and only touched rows are written.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace msrec {
namespace {

constexpr int64_t kGrainRows = 2048;

template <typename scalar_t>
bool all_zero_bits(const scalar_t* g, int64_t D) {
  // bitwise, so the compiler vectorizes it without -ffast-math (-0.0 reads as nonzero)
  using Bits = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint64_t>;
  Bits acc = 0;
  for (int64_t d = 0; d < D; ++d) {
    Bits b;
    std::memcpy(&b, g + d, sizeof(b));
    acc |= b;
  }
  return acc == 0;
}

template <typename scalar_t>
int64_t update_rows(scalar_t* __restrict__ w, scalar_t* __restrict__ g, scalar_t* __restrict__ m, int64_t r0,
                    int64_t r1, int64_t D, scalar_t lr, scalar_t eps) {
  int64_t updated = 0;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* __restrict__ gr = g + r * D;
    if (all_zero_bits(gr, D)) continue;
    scalar_t sq = 0;
    for (int64_t d = 0; d < D; ++d) sq += gr[d] * gr[d];
    const scalar_t mr = m[r] + sq / static_cast<scalar_t>(D);
    m[r] = mr;
    const scalar_t denom = std::sqrt(mr) + eps;
    scalar_t* __restrict__ wr = w + r * D;
    for (int64_t d = 0; d < D; ++d) {
      wr[d] -= lr * gr[d] / denom;
      gr[d] = 0;
    }
    ++updated;
  }
  return updated;
}

int64_t rowwise_adagrad_dense_(at::Tensor weight, at::Tensor grad, at::Tensor momentum, double lr, double eps) {
  const char* name = "msrec::rowwise_adagrad_dense_";
  TORCH_CHECK(weight.device().is_cpu() && grad.device().is_cpu() && momentum.device().is_cpu(), name,
              ": CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && grad.sizes() == weight.sizes(), name, ": weight and grad must be [rows, D] of one shape, got ",
              weight.sizes(), " and ", grad.sizes());
  TORCH_CHECK(momentum.dim() == 1 && momentum.size(0) == weight.size(0), name, ": momentum must be [rows] = [",
              weight.size(0), "], got ", momentum.sizes());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type() && momentum.scalar_type() == weight.scalar_type(), name,
              ": weight, grad and momentum must share a dtype");
  TORCH_CHECK(weight.is_contiguous() && grad.is_contiguous() && momentum.is_contiguous(), name,
              ": weight, grad and momentum must be contiguous");
  const int64_t rows = weight.size(0), D = weight.size(1);
  std::atomic<int64_t> updated{0};
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "rowwise_adagrad_dense_", [&] {
    scalar_t* w = weight.mutable_data_ptr<scalar_t>();
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    scalar_t* m = momentum.mutable_data_ptr<scalar_t>();
    const auto lr_s = static_cast<scalar_t>(lr), eps_s = static_cast<scalar_t>(eps);
    at::parallel_for(0, rows, kGrainRows, [&](int64_t r0, int64_t r1) {
      updated += update_rows(w, g, m, r0, r1, D, lr_s, eps_s);
    });
  });
  return updated.load();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(msrec, m) {
  m.def("rowwise_adagrad_dense_(Tensor(a!) weight, Tensor(b!) grad, Tensor(c!) momentum, float lr, float eps) -> int");
}

TORCH_LIBRARY_IMPL(msrec, CPU, m) { m.impl("rowwise_adagrad_dense_", &rowwise_adagrad_dense_); }

}  // namespace msrec
