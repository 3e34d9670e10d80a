// The CPU implementation of msrec::gate_combine (forward and backward), fused per sample.
//
//   msrec::gate_combine_cpp(Tensor expert_out [B, E, D], Tensor gate_logits [T, B, E], bool relu=False)
//       -> [T, B, D]
//   msrec::gate_combine_backward_cpp(Tensor grad_out [T, B, D], Tensor expert_out, Tensor gate_logits,
//       bool relu=False) -> (d expert_out (strides of expert_out), d gate_logits [T, B, E])
//
// out[t, b] = sum_e softmax(gate_logits[t, b])[e] * act(expert_out[b, e]), act = ReLU with `relu`
// (expert_out then holds the experts' pre-activations: the ReLU is applied as the rows are read,
// and its gradient mask as d expert_out is written), else the identity. kernels/ops.py routes the
// Python custom op msrec::gate_combine here on CPU when this extension is built (impl "auto" or
// "cpp"); kernels/ref_gate_combine.py is the definition and the test oracle.
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
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace msrec {
namespace {

constexpr int64_t kMaxExperts = 64;
constexpr int64_t kMaxTasks = 64;
constexpr int64_t kGrainWork = 16384;  // ~multiply-adds per parallel chunk

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
  bool relu;          // expert_out holds pre-activations: ReLU them on read, mask their gradient
};

// The experts' activation as the kernel reads a value: ReLU (max with 0; NaN stays NaN, as
// torch.relu) or the identity, chosen at compile time.
template <bool RELU, typename scalar_t>
MSREC_INLINE scalar_t act(scalar_t v) {
  return RELU ? (v < scalar_t(0) ? scalar_t(0) : v) : v;
}

// The gradient g at input v through the activation: ReLU's as torch's threshold_backward (0 where
// v <= 0), or g. Applied with the last term of d expert_out's sum, not as a pass of its own.
template <bool RELU, typename scalar_t>
MSREC_INLINE scalar_t relu_grad(scalar_t v, scalar_t g) {
  return RELU ? (v <= scalar_t(0) ? scalar_t(0) : g) : g;
}

// MSREC_CLONES / MSREC_INLINE: clones.h (AVX2 + FMA where the CPU has them, baseline x86-64 else).

// Samples go through the softmax kLanes at a time, one per SIMD lane: their logits are gathered
// lane-minor (p[(t * E + e) * kLanes + lane]), so the max, exp, sum and scale over E are each
// one vector instruction for 8 samples, and the exp is lane_exp's polynomial (vec_math.h). (A
// first version ran the softmax per sample with a libm expf call per logit: at T = 3, E = 4 the
// softmax was most of the kernel's time, ~150 ns per sample in forward, as much again in backward
// where it is recomputed.) Lanes past the chunk's end hold zero logits; nothing is written from them.
constexpr int64_t kLanes = 8;

// softmax over E of the gate logits of samples b .. b + nl (nl <= kLanes), every gate t:
// p[(t * E + e) * kLanes + l] = softmax(x[t, b + l, :])[e]. All -inf: NaN, as torch.softmax.
template <typename scalar_t>
MSREC_INLINE void softmax_lanes(const Args<scalar_t>& a, int64_t b, int64_t nl, scalar_t* __restrict__ p) {
  const int64_t T = a.T, E = a.E;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) {
      scalar_t* __restrict__ pe = p + (t * E + e) * kLanes;
      const scalar_t* xe = a.x + t * a.xt + b * a.xb + e * a.xe;
      for (int64_t l = 0; l < nl; ++l) pe[l] = xe[l * a.xb];
      for (int64_t l = nl; l < kLanes; ++l) pe[l] = scalar_t(0);
    }
    scalar_t* __restrict__ pt = p + t * E * kLanes;
    scalar_t m[kLanes], s[kLanes];
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) m[l] = pt[l];
    for (int64_t e = 1; e < E; ++e) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) m[l] = std::max(m[l], pt[e * kLanes + l]);
    }
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) s[l] = scalar_t(0);
    for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        const scalar_t v = lane_exp(pt[e * kLanes + l] - m[l]);
        pt[e * kLanes + l] = v;
        s[l] += v;
      }
    }
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) s[l] = scalar_t(1) / s[l];
    for (int64_t e = 0; e < E; ++e) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) pt[e * kLanes + l] *= s[l];
    }
  }
}

// out[t, b] = sum_e p[t, e] y[b, e], accumulated over e in the output row (D floats, in L1).
template <bool RELU, typename scalar_t>
MSREC_INLINE void forward_rows(const Args<scalar_t>& a, int64_t b0, int64_t b1, scalar_t* __restrict__ p) {
  const int64_t T = a.T, E = a.E, D = a.D;
  for (int64_t b = b0; b < b1; b += kLanes) {
    const int64_t nl = std::min(kLanes, b1 - b);
    softmax_lanes(a, b, nl, p);
    for (int64_t l = 0; l < nl; ++l) {
      const scalar_t* __restrict__ yb = a.y + (b + l) * a.yb;
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* pt = p + t * E * kLanes + l;  // p[t, e] of this sample at pt[e * kLanes]
        scalar_t* __restrict__ o = a.out + (t * a.B + b + l) * D;  // [D]
        const scalar_t w0 = pt[0];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = w0 * act<RELU>(yb[d]);
        for (int64_t e = 1; e < E; ++e) {
          const scalar_t w = pt[e * kLanes];
          const scalar_t* __restrict__ ye = yb + e * a.ye;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] += w * act<RELU>(ye[d]);
        }
      }
    }
  }
}

template <bool RELU, typename scalar_t>
MSREC_INLINE void backward_rows(const Args<scalar_t>& a, int64_t b0, int64_t b1, scalar_t* __restrict__ p) {
  const int64_t T = a.T, E = a.E, D = a.D;
  scalar_t dp[kMaxExperts];  // <grad_out[t, b], y[b, e]>
  for (int64_t b = b0; b < b1; b += kLanes) {
    const int64_t nl = std::min(kLanes, b1 - b);
    softmax_lanes(a, b, nl, p);  // recomputed, not saved by forward
    for (int64_t l = 0; l < nl; ++l) {
      const int64_t bl = b + l;
      const scalar_t* __restrict__ yb = a.y + bl * a.yb;
      const scalar_t* __restrict__ gb = a.g + bl * D;  // grad_out[0, b]; gate t at + t * B * D
      const int64_t gt = a.B * D;
      for (int64_t e = 0; e < E; ++e) {  // d y[b, e] = sum_t p[t, e] * grad_out[t, b]
        const scalar_t* pe = p + e * kLanes + l;  // p[t, e] of this sample at pe[t * E * kLanes]
        scalar_t* __restrict__ dye = a.dy + bl * a.dyb + e * a.dye;
        const scalar_t w0 = pe[0];
        const scalar_t* __restrict__ ye = yb + e * a.ye;
        if (T == 1) {
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dye[d] = relu_grad<RELU>(ye[d], w0 * gb[d]);
          continue;
        }
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dye[d] = w0 * gb[d];
        for (int64_t t = 1; t < T - 1; ++t) {
          const scalar_t w = pe[t * E * kLanes];
          const scalar_t* __restrict__ g = gb + t * gt;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) dye[d] += w * g[d];
        }
        const scalar_t wl = pe[(T - 1) * E * kLanes];  // the last task's term, with ReLU's mask
        const scalar_t* __restrict__ gl = gb + (T - 1) * gt;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dye[d] = relu_grad<RELU>(ye[d], dye[d] + wl * gl[d]);
      }
      for (int64_t t = 0; t < T; ++t) {  // d logits: softmax backward of <grad_out, y>
        const scalar_t* __restrict__ g = gb + t * gt;
        scalar_t s = 0;
        for (int64_t e = 0; e < E; ++e) {
          const scalar_t* __restrict__ ye = yb + e * a.ye;
          scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < D; ++d) acc += g[d] * act<RELU>(ye[d]);
          dp[e] = acc;
          s += p[(t * E + e) * kLanes + l] * acc;
        }
        scalar_t* dxt = a.out + (t * a.B + bl) * E;
        for (int64_t e = 0; e < E; ++e) dxt[e] = p[(t * E + e) * kLanes + l] * (dp[e] - s);
      }
    }
  }
}

MSREC_CLONES void run_forward(const Args<float>& a, int64_t b0, int64_t b1, float* p) {
  a.relu ? forward_rows<true>(a, b0, b1, p) : forward_rows<false>(a, b0, b1, p);
}
MSREC_CLONES void run_forward(const Args<double>& a, int64_t b0, int64_t b1, double* p) {
  a.relu ? forward_rows<true>(a, b0, b1, p) : forward_rows<false>(a, b0, b1, p);
}
MSREC_CLONES void run_backward(const Args<float>& a, int64_t b0, int64_t b1, float* p) {
  a.relu ? backward_rows<true>(a, b0, b1, p) : backward_rows<false>(a, b0, b1, p);
}
MSREC_CLONES void run_backward(const Args<double>& a, int64_t b0, int64_t b1, double* p) {
  a.relu ? backward_rows<true>(a, b0, b1, p) : backward_rows<false>(a, b0, b1, p);
}

template <typename scalar_t>
Args<scalar_t> make_args(const at::Tensor& y, const at::Tensor& x, bool relu) {
  Args<scalar_t> a{};
  a.relu = relu;
  a.y = y.const_data_ptr<scalar_t>();
  a.yb = y.stride(0), a.ye = y.stride(1);
  a.x = x.const_data_ptr<scalar_t>();
  a.xt = x.stride(0), a.xb = x.stride(1), a.xe = x.stride(2);
  a.T = x.size(0), a.B = y.size(0), a.E = y.size(1), a.D = y.size(2);
  return a;
}

at::Tensor gate_combine_cpp(const at::Tensor& expert_out, const at::Tensor& gate_logits, bool relu) {
  check_inputs(expert_out, gate_logits, "msrec::gate_combine_cpp");
  const at::Tensor y = last_dim_contiguous(expert_out);
  const int64_t T = gate_logits.size(0), B = y.size(0), E = y.size(1), D = y.size(2);
  at::Tensor out = at::empty({T, B, D}, y.options());  // [T, B, D] contiguous
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gate_combine_cpp", [&] {
    Args<scalar_t> a = make_args<scalar_t>(y, gate_logits, relu);
    a.out = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, grain(T, E, D), [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> p(a.T * a.E * kLanes);  // softmax scratch of this chunk
      run_forward(a, b0, b1, p.data());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gate_combine_backward_cpp(const at::Tensor& grad_out, const at::Tensor& expert_out,
                                                             const at::Tensor& gate_logits, bool relu) {
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
    Args<scalar_t> a = make_args<scalar_t>(y, gate_logits, relu);
    a.g = g.const_data_ptr<scalar_t>();
    a.out = d_x.mutable_data_ptr<scalar_t>();
    a.dy = d_y.mutable_data_ptr<scalar_t>();
    a.dyb = d_y.stride(0), a.dye = d_y.stride(1);
    at::parallel_for(0, B, grain(T, E, D), [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> p(a.T * a.E * kLanes);
      run_backward(a, b0, b1, p.data());
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
                            const at::Tensor& gate_logits, bool relu) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("msrec::gate_combine_cpp", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, bool)>();
    ctx->save_for_backward({expert_out, gate_logits});
    ctx->saved_data["relu"] = relu;
    return op.call(expert_out, gate_logits, relu);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("msrec::gate_combine_backward_cpp", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, bool)>();
    const auto saved = ctx->get_saved_variables();
    auto [d_y, d_x] = op.call(grads[0], saved[0], saved[1], ctx->saved_data["relu"].toBool());
    return {d_y, d_x, at::Tensor()};
  }
};

at::Tensor gate_combine_cpp_autograd(const at::Tensor& expert_out, const at::Tensor& gate_logits, bool relu) {
  return GateCombineFunction::apply(expert_out, gate_logits, relu);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(msrec, m) {
  m.def("gate_combine_cpp(Tensor expert_out, Tensor gate_logits, bool relu=False) -> Tensor");
  m.def("gate_combine_backward_cpp(Tensor grad_out, Tensor expert_out, Tensor gate_logits, bool relu=False) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(msrec, CPU, m) {
  m.impl("gate_combine_cpp", &gate_combine_cpp);
  m.impl("gate_combine_backward_cpp", &gate_combine_backward_cpp);
}

TORCH_LIBRARY_IMPL(msrec, Autograd, m) {
  m.impl("gate_combine_cpp", &gate_combine_cpp_autograd);
}

}  // namespace msrec
