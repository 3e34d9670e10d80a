// The CPU implementation of msrec::field_attention (forward and backward), fused per (sample, head).
//
//   msrec::field_attention_cpp(Tensor q, Tensor k, Tensor v [B, H, F, dh], Tensor? key_padding_mask [B, F])
//       -> (out [B, H, F, dh], lse [B, H, F])
//   msrec::field_attention_backward_cpp(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask,
//                                       Tensor lse) -> (dq, dk, dv)
//
// out = softmax(q k^T / sqrt(dh)) v over the F fields of one sample and head; padded keys
// (mask True) get probability 0; a query whose keys are all padded gets lse = +inf and a zero
// row. lse is the row log-sum-exp of the scaled scores, in the input dtype. Backward recomputes
// P = exp(S - lse) from the saved lse:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(P * dP)),  dQ = dS K / sqrt(dh),  dK = dS^T Q / sqrt(dh)
// kernels/ops.py routes msrec::field_attention here on CPU when this extension is built (impl
// "auto" or "cpp"); kernels/field_attention_ref.py is the definition and the test oracle.
//
// Why by hand: the model's attention is over a handful of fields with small heads (msrec: F = 8,
// H = 2, dh = 8), so PyTorch runs it as bmm over B*H 8x8 matrices plus softmax, masking and
// transpose passes, each allocating a [B, H, F, F] temporary: about 3.5 ms forward + backward
// at B = 1024 on this project's 2-core CPU, 11 ms at B = 4096 (SDPA on CPU: about the same). Per
// (sample, head) the whole problem is a few hundred multiply-adds that fit in L1; one pass reads
// q, k, v once and writes out and lse once.
//
// fp32 and fp64 (math in the input dtype, as the reference); inputs are made contiguous.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace msrec {
namespace {

constexpr int64_t kGrainWork = 16384;  // ~multiply-adds per parallel chunk

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask, const char* name) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(q.dim() == 4, name, ": q must be [B, H, F, dh], got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), name, ": q, k, v shapes differ: ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), name, ": dtypes differ");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, name,
              ": float32 or float64 only, got ", q.scalar_type());
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == q.size(0) &&
                    mask->size(1) == q.size(2),
                name, ": key_padding_mask must be bool [", q.size(0), ", ", q.size(2), "], got ", mask->sizes());
    TORCH_CHECK(mask->device().is_cpu(), name, ": key_padding_mask on another device");
  }
}

int64_t grain(int64_t F, int64_t DH) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, 2 * F * F * DH));
}

// Raw pointers of one call; every [B, H, F, dh] tensor contiguous, (b, h) block at bh * F * dh.
template <typename scalar_t>
struct Args {
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const bool* mask;  // [B, F] or nullptr
  const scalar_t* dout;  // backward
  scalar_t* out;   // forward
  scalar_t* lse;   // forward: written; backward: read
  scalar_t* dq;
  scalar_t* dk;
  scalar_t* dv;
  int64_t H, F, DH;
  scalar_t scale;
};

// Same clones as csrc/gate_combine.cpp: AVX2 + FMA where the CPU has them, baseline x86-64 else.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MSREC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MSREC_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MSREC_CLONES
#endif
#define MSREC_INLINE inline __attribute__((always_inline))

template <typename scalar_t>
MSREC_INLINE void axpy(scalar_t w, const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += w * x[d];
}

// exp(x) for a row of scores, vectorizable. fp32: the Cephes expf polynomial (relative error
// about 1e-7, as std::exp within 2 ulp) with the power of two built in the exponent bits, so the
// loop runs 8 lanes wide under AVX2 instead of one libm call per score (which took most of the
// kernel's time: F * F exps per sample and head); x below -87.3 (padded keys: -inf) gives 0.
// fp64 (gradcheck) keeps std::exp.
MSREC_INLINE float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return x < -87.3f ? 0.0f : y * pow2;
}

MSREC_INLINE void exp_row(const float* __restrict__ s, float shift, float* __restrict__ out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = exp_approx(s[j] - shift);
}

MSREC_INLINE void exp_row(const double* __restrict__ s, double shift, double* __restrict__ out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = std::exp(s[j] - shift);
}

// x^T [DH, F] of one (sample, head) block x [F, DH]: the products over keys below then run
// across the F keys with unit stride (one 8-lane vector per dh element at F = 8) instead of as F
// separate dot products of DH elements, each ending in a horizontal sum.
template <typename scalar_t>
MSREC_INLINE void transpose_block(const scalar_t* __restrict__ x, int64_t F, int64_t DH, scalar_t* __restrict__ xt) {
  for (int64_t j = 0; j < F; ++j)
    for (int64_t d = 0; d < DH; ++d) xt[d * F + j] = x[j * DH + d];
}

// r[j] = sum_d a[d] * bt[d, j] for every key j: a row of a @ b^T from b^T [DH, F].
template <typename scalar_t>
MSREC_INLINE void row_times(const scalar_t* __restrict__ a, const scalar_t* __restrict__ bt, int64_t F, int64_t DH,
                            scalar_t* __restrict__ r) {
  std::fill(r, r + F, scalar_t(0));
  for (int64_t d = 0; d < DH; ++d) {
    const scalar_t ad = a[d];
    const scalar_t* __restrict__ bd = bt + d * F;
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) r[j] += ad * bd[j];
  }
}

// Scaled scores of query row i against every key [F] (-inf at padded keys); returns their max.
template <typename scalar_t>
MSREC_INLINE scalar_t score_row(const Args<scalar_t>& a, int64_t DH, const scalar_t* qi, const scalar_t* kt,
                                const bool* mrow, scalar_t* s) {
  row_times(qi, kt, a.F, DH, s);
  scalar_t m = -std::numeric_limits<scalar_t>::infinity();
  for (int64_t j = 0; j < a.F; ++j) {
    s[j] = (mrow != nullptr && mrow[j]) ? -std::numeric_limits<scalar_t>::infinity() : s[j] * a.scale;
    m = std::max(m, s[j]);
  }
  return m;
}

// kDH > 0: the head size as a compile-time constant (8, 16, 32: the dot products and updates
// over dh unroll into a few vector instructions; about 2x faster at dh = 8), 0: a.DH at run time.
template <typename scalar_t, int64_t kDH>
MSREC_INLINE void forward_blocks(const Args<scalar_t>& a, int64_t bh0, int64_t bh1) {
  const int64_t F = a.F, DH = kDH > 0 ? kDH : a.DH;
  std::vector<scalar_t> s(F), e(F), kt(F * DH);
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t base = bh * F * DH;
    const bool* mrow = a.mask == nullptr ? nullptr : a.mask + (bh / a.H) * F;
    const scalar_t *q0 = a.q + base, *k0 = a.k + base, *v0 = a.v + base;
    transpose_block(k0, F, DH, kt.data());
    for (int64_t i = 0; i < F; ++i) {
      scalar_t* __restrict__ o = a.out + base + i * DH;
      std::fill(o, o + DH, scalar_t(0));
      const scalar_t m = score_row(a, DH, q0 + i * DH, kt.data(), mrow, s.data());
      if (m == -std::numeric_limits<scalar_t>::infinity()) {  // every key padded: zero row, P = 0
        a.lse[bh * F + i] = std::numeric_limits<scalar_t>::infinity();
        continue;
      }
      exp_row(s.data(), m, e.data(), F);  // exp(s - max): one exp per score
      scalar_t sum = 0;
      for (int64_t j = 0; j < F; ++j) sum += e[j];
      a.lse[bh * F + i] = m + std::log(sum);
      const scalar_t inv = scalar_t(1) / sum;
      for (int64_t j = 0; j < F; ++j) {
        if (e[j] != 0) axpy(e[j] * inv, v0 + j * DH, o, DH);
      }
    }
  }
}

template <typename scalar_t, int64_t kDH>
MSREC_INLINE void backward_blocks(const Args<scalar_t>& a, int64_t bh0, int64_t bh1) {
  const int64_t F = a.F, DH = kDH > 0 ? kDH : a.DH;
  std::vector<scalar_t> p(F), dp(F), kt(F * DH), vt(F * DH);
  for (int64_t bh = bh0; bh < bh1; ++bh) {
    const int64_t base = bh * F * DH;
    const bool* mrow = a.mask == nullptr ? nullptr : a.mask + (bh / a.H) * F;
    const scalar_t *q0 = a.q + base, *k0 = a.k + base, *v0 = a.v + base, *do0 = a.dout + base;
    transpose_block(k0, F, DH, kt.data());
    transpose_block(v0, F, DH, vt.data());
    scalar_t *dq0 = a.dq + base, *dk0 = a.dk + base, *dv0 = a.dv + base;
    std::fill(dk0, dk0 + F * DH, scalar_t(0));
    std::fill(dv0, dv0 + F * DH, scalar_t(0));
    for (int64_t i = 0; i < F; ++i) {
      const scalar_t* qi = q0 + i * DH;
      const scalar_t* doi = do0 + i * DH;
      scalar_t* __restrict__ dqi = dq0 + i * DH;
      std::fill(dqi, dqi + DH, scalar_t(0));
      const scalar_t lse = a.lse[bh * F + i];
      if (lse == std::numeric_limits<scalar_t>::infinity()) continue;  // all keys padded: P = 0
      score_row(a, DH, qi, kt.data(), mrow, dp.data());
      exp_row(dp.data(), lse, p.data(), F);  // P_ij = exp(S_ij - lse_i)
      row_times(doi, vt.data(), F, DH, dp.data());  // dP_ij = <dO_i, V_j>
      scalar_t rowsum = 0;  // sum_j P_ij dP_ij
      for (int64_t j = 0; j < F; ++j) rowsum += p[j] * dp[j];
      for (int64_t j = 0; j < F; ++j) {
        if (p[j] == 0) continue;
        axpy(p[j], doi, dv0 + j * DH, DH);                   // dV_j += P_ij dO_i
        const scalar_t ds = p[j] * (dp[j] - rowsum) * a.scale;  // dS_ij / sqrt(dh)
        axpy(ds, k0 + j * DH, dqi, DH);                      // dQ_i += dS_ij K_j
        axpy(ds, qi, dk0 + j * DH, DH);                      // dK_j += dS_ij Q_i
      }
    }
  }
}

template <typename scalar_t>
MSREC_INLINE void forward_any(const Args<scalar_t>& a, int64_t b0, int64_t b1) {
  switch (a.DH) {
    case 8: return forward_blocks<scalar_t, 8>(a, b0, b1);
    case 16: return forward_blocks<scalar_t, 16>(a, b0, b1);
    case 32: return forward_blocks<scalar_t, 32>(a, b0, b1);
    default: return forward_blocks<scalar_t, 0>(a, b0, b1);
  }
}

template <typename scalar_t>
MSREC_INLINE void backward_any(const Args<scalar_t>& a, int64_t b0, int64_t b1) {
  switch (a.DH) {
    case 8: return backward_blocks<scalar_t, 8>(a, b0, b1);
    case 16: return backward_blocks<scalar_t, 16>(a, b0, b1);
    case 32: return backward_blocks<scalar_t, 32>(a, b0, b1);
    default: return backward_blocks<scalar_t, 0>(a, b0, b1);
  }
}

MSREC_CLONES void run_forward(const Args<float>& a, int64_t b0, int64_t b1) { forward_any(a, b0, b1); }
MSREC_CLONES void run_forward(const Args<double>& a, int64_t b0, int64_t b1) { forward_any(a, b0, b1); }
MSREC_CLONES void run_backward(const Args<float>& a, int64_t b0, int64_t b1) { backward_any(a, b0, b1); }
MSREC_CLONES void run_backward(const Args<double>& a, int64_t b0, int64_t b1) { backward_any(a, b0, b1); }

template <typename scalar_t>
Args<scalar_t> make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& mask) {
  Args<scalar_t> a{};
  a.q = q.const_data_ptr<scalar_t>();
  a.k = k.const_data_ptr<scalar_t>();
  a.v = v.const_data_ptr<scalar_t>();
  a.mask = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  a.H = q.size(1), a.F = q.size(2), a.DH = q.size(3);
  a.scale = scalar_t(1) / std::sqrt(scalar_t(a.DH));
  return a;
}

std::optional<at::Tensor> contiguous_mask(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> field_attention_cpp(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in,
                                                       const std::optional<at::Tensor>& mask_in) {
  check_inputs(q_in, k_in, v_in, mask_in, "msrec::field_attention_cpp");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto mask = contiguous_mask(mask_in);
  const int64_t B = q.size(0), H = q.size(1), F = q.size(2), DH = q.size(3);
  at::Tensor out = at::empty({B, H, F, DH}, q.options());
  at::Tensor lse = at::empty({B, H, F}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "field_attention_cpp", [&] {
    Args<scalar_t> a = make_args<scalar_t>(q, k, v, mask);
    a.out = out.mutable_data_ptr<scalar_t>();
    a.lse = lse.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * H, grain(F, DH), [&](int64_t b0, int64_t b1) { run_forward(a, b0, b1); });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> field_attention_backward_cpp(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& mask_in, const at::Tensor& lse_in) {
  check_inputs(q_in, k_in, v_in, mask_in, "msrec::field_attention_backward_cpp");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor g = grad_out.contiguous(), lse = lse_in.contiguous();
  const auto mask = contiguous_mask(mask_in);
  const int64_t B = q.size(0), H = q.size(1), F = q.size(2), DH = q.size(3);
  TORCH_CHECK(g.sizes() == q.sizes() && g.scalar_type() == q.scalar_type(),
              "msrec::field_attention_backward_cpp: grad_out must be ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == F &&
                  lse.scalar_type() == q.scalar_type(),
              "msrec::field_attention_backward_cpp: lse must be [B, H, F] in the input dtype, got ", lse.sizes());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "field_attention_backward_cpp", [&] {
    Args<scalar_t> a = make_args<scalar_t>(q, k, v, mask);
    a.dout = g.const_data_ptr<scalar_t>();
    a.lse = const_cast<scalar_t*>(lse.const_data_ptr<scalar_t>());  // read only in backward
    a.dq = dq.mutable_data_ptr<scalar_t>();
    a.dk = dk.mutable_data_ptr<scalar_t>();
    a.dv = dv.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * H, grain(F, DH), [&](int64_t b0, int64_t b1) { run_backward(a, b0, b1); });
  });
  return {dq, dk, dv};
}

// Autograd in C++, as for gate_combine_cpp: the CPU path runs no Python in forward or backward.
// lse is an output that is not differentiable. Both directions redispatch to the ops so fake
// tensors reach the fakes in kernels/ops.py.
class FieldAttentionFunction : public torch::autograd::Function<FieldAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& v,
                                                const std::optional<at::Tensor>& mask) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("msrec::field_attention_cpp", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&,
                                                                   const std::optional<at::Tensor>&)>();
    auto [out, lse] = op.call(q, k, v, mask);
    ctx->save_for_backward({q, k, v, lse});
    ctx->saved_data["has_mask"] = mask.has_value();
    if (mask.has_value()) ctx->saved_data["mask"] = *mask;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("msrec::field_attention_backward_cpp", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, const at::Tensor&)>();
    const auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> mask;
    if (ctx->saved_data["has_mask"].toBool()) mask = ctx->saved_data["mask"].toTensor();
    at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(saved[0]);
    auto [dq, dk, dv] = op.call(grad_out, saved[0], saved[1], saved[2], mask, saved[3]);
    return {dq, dk, dv, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> field_attention_cpp_autograd(const at::Tensor& q, const at::Tensor& k,
                                                                const at::Tensor& v,
                                                                const std::optional<at::Tensor>& mask) {
  auto outs = FieldAttentionFunction::apply(q, k, v, mask);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(msrec, m) {
  m.def("field_attention_cpp(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask) -> (Tensor, Tensor)");
  m.def(
      "field_attention_backward_cpp(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, "
      "Tensor lse) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(msrec, CPU, m) {
  m.impl("field_attention_cpp", &field_attention_cpp);
  m.impl("field_attention_backward_cpp", &field_attention_backward_cpp);
}

TORCH_LIBRARY_IMPL(msrec, Autograd, m) {
  m.impl("field_attention_cpp", &field_attention_cpp_autograd);
}

}  // namespace msrec
