// The CPU implementation of msrec::gate_combine (forward and backward), fused per sample.
//
//   msrec::gate_combine_cpp(Tensor expert_out [B, E, D], Tensor gate_logits [T, B, E]) -> [T, B, D]
//   msrec::gate_combine_backward_cpp(Tensor grad_out [T, B, D], Tensor expert_out, Tensor gate_logits)
//       -> (d expert_out (strides of expert_out), d gate_logits [T, B, E])
//
// out[t, b] = sum_e softmax(gate_logits[t, b])[e] * expert_out[b, e]. kernels/ops.py routes the
// Python custom op msrec::gate_combine here on CPU when this extension is built (impl "auto" or
// "cpp"); kernels/gate_combine_ref.py is the definition and the test oracle.
//
// Why by hand: per sample this is a [T, E] @ [E, D] product with T, E <= 16, so PyTorch runs it
// as a bmm over B tiny matrices plus separate softmax / transpose / copy passes, each allocating
// a [T, B, *] temporary (about 2 ms forward + backward at B=1024, E=4, D=64 on 2 cores). Here one
// pass per sample reads the logits and expert rows once, keeps the softmax in registers/stack
// and writes the output once; the backward recomputes the softmax instead of storing it.
//
// expert_out may have any strides over B and E (PLE hands in a transposed view of its [E, B, D]
// expert stack, so no copy is made); its last dim must be contiguous (else it is copied). fp32
// and fp64 only (math in the input dtype, as the reference); other dtypes use the reference.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "clones.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace msrec {
namespace {

constexpr int64_t kMaxExperts = 64;
constexpr int64_t kMaxTasks = 64;
constexpr int64_t kGrainWork = 16384;  // ~multiply-adds per parallel chunk

// softmax over the E logits x[0], x[se], ... into p[E].
template <typename scalar_t>
inline __attribute__((always_inline)) void softmax_row(const scalar_t* x, int64_t E, int64_t se, scalar_t* p) {
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t e = 0; e < E; ++e) m = std::max(m, x[e * se]);
  scalar_t s = 0;
  for (int64_t e = 0; e < E; ++e) {
    p[e] = std::exp(x[e * se] - m);
    s += p[e];
  }
  const scalar_t inv = scalar_t(1) / s;  // all -inf: NaN, as torch.softmax
  for (int64_t e = 0; e < E; ++e) p[e] *= inv;
}

void check_inputs(const at::Tensor& y, const at::Tensor& x, const char* name) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(y.dim() == 3 && x.dim() == 3, name, ": expert_out must be [B, E, D], gate_logits [T, B, E]");
  TORCH_CHECK(x.size(1) == y.size(0) && x.size(2) == y.size(1), name, ": gate_logits ", x.sizes(),
              " does not match expert_out ", y.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), name, ": dtypes differ");
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble, name,
              ": float32 or float64 only, got ", y.scalar_type());
  TORCH_CHECK(y.size(1) >= 1, name, ": at least one expert");
  TORCH_CHECK(y.size(1) <= kMaxExperts && x.size(0) <= kMaxTasks, name, ": at most ", kMaxExperts,
              " experts and ", kMaxTasks, " tasks");
}

at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

int64_t grain(int64_t T, int64_t E, int64_t D) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, T * E * D));
}

// Raw pointers and strides of one call; rows of expert_out: y + b*yb + e*ye (D contiguous).
template <typename scalar_t>
struct Args {
  const scalar_t* y;
  int64_t yb, ye;
  const scalar_t* x;  // gate logits [T, B, E]
  int64_t xt, xb, xe;
  const scalar_t* g;  // grad_out [T, B, D] contiguous (backward)
  scalar_t* out;      // forward: [T, B, D] contiguous; backward: d gate logits [T, B, E] contiguous
  scalar_t* dy;       // backward: d expert_out, strides dyb, dye
  int64_t dyb, dye;
  int64_t T, B, E, D;
};

// MSREC_CLONES / MSREC_INLINE: clones.h (AVX2 + FMA where the CPU has them, baseline x86-64 else).

template <typename scalar_t>
MSREC_INLINE void forward_rows(const Args<scalar_t>& a, int64_t b0, int64_t b1) {
  scalar_t p[kMaxExperts];
  const int64_t E = a.E, D = a.D;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t t = 0; t < a.T; ++t) {
      softmax_row(a.x + t * a.xt + b * a.xb, E, a.xe, p);
      scalar_t* __restrict__ o = a.out + (t * a.B + b) * D;  // [D]
      const scalar_t* __restrict__ y0 = a.y + b * a.yb;
      const scalar_t w0 = p[0];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] = w0 * y0[d];
      for (int64_t e = 1; e < E; ++e) {
        const scalar_t w = p[e];
        const scalar_t* __restrict__ ye = a.y + b * a.yb + e * a.ye;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += w * ye[d];
      }
    }
  }
}

template <typename scalar_t>
MSREC_INLINE void backward_rows(const Args<scalar_t>& a, int64_t b0, int64_t b1) {
  scalar_t p[kMaxTasks * kMaxExperts];  // softmax [T, E], recomputed
  scalar_t dp[kMaxExperts];             // <grad_out[t, b], y[b, e]>
  const int64_t T = a.T, E = a.E, D = a.D;
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t t = 0; t < T; ++t) softmax_row(a.x + t * a.xt + b * a.xb, E, a.xe, p + t * E);
    for (int64_t e = 0; e < E; ++e) {  // d y[b, e] = sum_t p[t, e] * grad_out[t, b]
      scalar_t* __restrict__ dye = a.dy + b * a.dyb + e * a.dye;
      const scalar_t* __restrict__ g0 = a.g + b * D;
      const scalar_t w0 = p[e];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) dye[d] = w0 * g0[d];
      for (int64_t t = 1; t < T; ++t) {
        const scalar_t w = p[t * E + e];
        const scalar_t* __restrict__ gt = a.g + (t * a.B + b) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dye[d] += w * gt[d];
      }
    }
    for (int64_t t = 0; t < T; ++t) {  // d logits: softmax backward of <grad_out, y>
      const scalar_t* __restrict__ gt = a.g + (t * a.B + b) * D;
      const scalar_t* pt = p + t * E;
      scalar_t s = 0;
      for (int64_t e = 0; e < E; ++e) {
        const scalar_t* __restrict__ ye = a.y + b * a.yb + e * a.ye;
        scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += gt[d] * ye[d];
        dp[e] = acc;
        s += pt[e] * acc;
      }
      scalar_t* dxt = a.out + (t * a.B + b) * E;
      for (int64_t e = 0; e < E; ++e) dxt[e] = pt[e] * (dp[e] - s);
    }
  }
}

MSREC_CLONES void run_forward(const Args<float>& a, int64_t b0, int64_t b1) { forward_rows(a, b0, b1); }
MSREC_CLONES void run_forward(const Args<double>& a, int64_t b0, int64_t b1) { forward_rows(a, b0, b1); }
MSREC_CLONES void run_backward(const Args<float>& a, int64_t b0, int64_t b1) { backward_rows(a, b0, b1); }
MSREC_CLONES void run_backward(const Args<double>& a, int64_t b0, int64_t b1) { backward_rows(a, b0, b1); }

template <typename scalar_t>
Args<scalar_t> make_args(const at::Tensor& y, const at::Tensor& x) {
  Args<scalar_t> a{};
  a.y = y.const_data_ptr<scalar_t>();
  a.yb = y.stride(0), a.ye = y.stride(1);
  a.x = x.const_data_ptr<scalar_t>();
  a.xt = x.stride(0), a.xb = x.stride(1), a.xe = x.stride(2);
  a.T = x.size(0), a.B = y.size(0), a.E = y.size(1), a.D = y.size(2);
  return a;
}

at::Tensor gate_combine_cpp(const at::Tensor& expert_out, const at::Tensor& gate_logits) {
  check_inputs(expert_out, gate_logits, "msrec::gate_combine_cpp");
  const at::Tensor y = last_dim_contiguous(expert_out);
  const int64_t T = gate_logits.size(0), B = y.size(0), E = y.size(1), D = y.size(2);
  at::Tensor out = at::empty({T, B, D}, y.options());  // [T, B, D] contiguous
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gate_combine_cpp", [&] {
    Args<scalar_t> a = make_args<scalar_t>(y, gate_logits);
    a.out = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(T, E, D), [&](int64_t b0, int64_t b1) {
      run_forward(a, b0, b1);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_combine_backward_cpp(const at::Tensor& grad_out, const at::Tensor& expert_out,
                                                             const at::Tensor& gate_logits) {
  check_inputs(expert_out, gate_logits, "msrec::gate_combine_backward_cpp");
  const at::Tensor y = last_dim_contiguous(expert_out);
  const at::Tensor g = grad_out.contiguous();  // [T, B, D]
  const int64_t T = gate_logits.size(0), B = y.size(0), E = y.size(1), D = y.size(2);
  TORCH_CHECK(g.dim() == 3 && g.size(0) == T && g.size(1) == B && g.size(2) == D,
              "msrec::gate_combine_backward_cpp: grad_out must be [T, B, D], got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == y.scalar_type(), "msrec::gate_combine_backward_cpp: grad_out dtype differs");
  at::Tensor d_y = at::empty_like(y);  // same strides as expert_out (no transpose copy downstream)
  at::Tensor d_x = at::empty({T, B, E}, gate_logits.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gate_combine_backward_cpp", [&] {
    Args<scalar_t> a = make_args<scalar_t>(y, gate_logits);
    a.g = g.const_data_ptr<scalar_t>();
    a.out = d_x.mutable_data_ptr<scalar_t>();
    a.dy = d_y.mutable_data_ptr<scalar_t>();
    a.dyb = d_y.stride(0), a.dye = d_y.stride(1);
    at::parallel_for(0, B, grain(T, E, D), [&](int64_t b0, int64_t b1) {
      run_backward(a, b0, b1);
    });
  });
  return {d_y, d_x};
}

// Autograd for gate_combine_cpp in C++: calling torch.ops.msrec.gate_combine_cpp with inputs
// that require grad records this node, so the CPU path needs no Python in forward or backward
// (the Python custom op msrec::gate_combine costs about 0.2-0.3 ms per call and as much again in
// its backward, more than the kernel itself at B=1024). Both directions redispatch to the ops
// (not the functions above) so fake tensors (torch.compile, opcheck) reach the fakes in
// kernels/ops.py.
class GateCombineFunction : public torch::autograd::Function<GateCombineFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& expert_out,
                            const at::Tensor& gate_logits) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("msrec::gate_combine_cpp", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    ctx->save_for_backward({expert_out, gate_logits});
    return op.call(expert_out, gate_logits);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("msrec::gate_combine_backward_cpp", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    auto [d_y, d_x] = op.call(grads[0], saved[0], saved[1]);
    return {d_y, d_x};
  }
};

at::Tensor gate_combine_cpp_autograd(const at::Tensor& expert_out, const at::Tensor& gate_logits) {
  return GateCombineFunction::apply(expert_out, gate_logits);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(msrec, m) {
  m.def("gate_combine_cpp(Tensor expert_out, Tensor gate_logits) -> Tensor");
  m.def("gate_combine_backward_cpp(Tensor grad_out, Tensor expert_out, Tensor gate_logits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(msrec, CPU, m) {
  m.impl("gate_combine_cpp", &gate_combine_cpp);
  m.impl("gate_combine_backward_cpp", &gate_combine_backward_cpp);
}

TORCH_LIBRARY_IMPL(msrec, Autograd, m) {
  m.impl("gate_combine_cpp", &gate_combine_cpp_autograd);
}

}  // namespace msrec
