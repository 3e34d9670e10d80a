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
// "auto" or "cpp"); kernels/ref_field_attention.py is the definition and the test oracle.
//
// Why by hand: the model's attention is over a handful of fields with small heads (msrec: F = 10,
// H = 2, dh = 8), so PyTorch runs it as bmm over B*H 10x10 matrices plus softmax, masking and
// transpose passes, each allocating a [B, H, F, F] temporary (SDPA on CPU: about the same). Here
// 8 (sample, head) blocks run at once, one per SIMD lane (see kLanes), reading q, k, v once and
// writing out and lse once (forward about 2x the reference's speed at msrec's shape, B = 4096).
//
// fp32 and fp64 (math in the input dtype, as the reference); q, k, v are read through their strides
// where dh is contiguous (else copied), the other tensors are made contiguous.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "clones.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
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

int64_t grain(int64_t F, int64_t DH) {  // in groups of 8 (sample, head) blocks
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, 16 * F * F * DH));
}

// Raw pointers of one call. out, lse, dout, dq, dk, dv are contiguous [B, H, F, dh] ((b, h) block at
// bh * F * dh); q, k, v are read through their strides (qkv_strides: B, H, F; dh contiguous), so a
// view of one fused projection (attention.py's [B, F, 3, H, dh] permuted) needs no copy.
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
  int64_t q_strides[3], k_strides[3], v_strides[3];  // B, H, F
  scalar_t scale;
};

// MSREC_CLONES / MSREC_INLINE: clones.h (AVX2 + FMA where the CPU has them, baseline x86-64 else).

// lane_exp: vec_math.h (the vectorizable exp shared with gate_combine.cpp).

// The kernels below work on groups of kLanes (sample, head) blocks at once, one block per SIMD
// lane: each block's q, k, v are first laid out lane-minor (x[(f * DH + d) * kLanes + lane]), so
// every step of the per-block algorithm (a score, its exp, max, sum, the products over dh) is one
// vector instruction across 8 blocks, with no horizontal sums and no short loops over dh or F.
// (A first version vectorized within a block, over dh = 8 or F = 10: about as slow as the
// reference at the model's shape.) Blocks past the end of a group's range are zero lanes that
// nothing is written from.
constexpr int64_t kLanes = 8;

// x [n_blocks, FD] rows bh0 .. bh0 + nl -> xs[n * kLanes + lane] (zeros in lanes >= nl)
template <typename scalar_t>
MSREC_INLINE void gather_lanes(const scalar_t* __restrict__ x, int64_t bh0, int64_t nl, int64_t FD,
                               scalar_t* __restrict__ xs) {
  std::fill(xs, xs + FD * kLanes, scalar_t(0));
  for (int64_t l = 0; l < nl; ++l) {
    const scalar_t* __restrict__ row = x + (bh0 + l) * FD;
    for (int64_t n = 0; n < FD; ++n) xs[n * kLanes + l] = row[n];
  }
}

// The same from a strided [B, H, F, dh] tensor (strides: B, H, F; dh contiguous).
template <typename scalar_t>
MSREC_INLINE void gather_lanes_strided(const scalar_t* __restrict__ x, const int64_t* strides, int64_t H, int64_t F,
                                       int64_t DH, int64_t bh0, int64_t nl, scalar_t* __restrict__ xs) {
  std::fill(xs, xs + F * DH * kLanes, scalar_t(0));
  for (int64_t l = 0; l < nl; ++l) {
    const int64_t bh = bh0 + l;
    const scalar_t* __restrict__ block = x + (bh / H) * strides[0] + (bh % H) * strides[1];
    for (int64_t f = 0; f < F; ++f) {
      const scalar_t* __restrict__ row = block + f * strides[2];
      for (int64_t d = 0; d < DH; ++d) xs[(f * DH + d) * kLanes + l] = row[d];
    }
  }
}

template <typename scalar_t>
MSREC_INLINE void scatter_lanes(const scalar_t* __restrict__ xs, int64_t bh0, int64_t nl, int64_t FD,
                                scalar_t* __restrict__ x) {
  for (int64_t l = 0; l < nl; ++l) {
    scalar_t* __restrict__ row = x + (bh0 + l) * FD;
    for (int64_t n = 0; n < FD; ++n) row[n] = xs[n * kLanes + l];
  }
}


// Scaled scores of query row i of every lane against every key: s[j * kLanes + lane], -inf at
// padded keys (bias: the lanes' key masks as 0 / -inf, lane-minor); m: each lane's row max.
template <typename scalar_t>
MSREC_INLINE void lane_scores(const scalar_t* __restrict__ qs, const scalar_t* __restrict__ ks,
                              const scalar_t* __restrict__ bias, int64_t i, int64_t F, int64_t DH, scalar_t scale,
                              scalar_t* __restrict__ s, scalar_t* __restrict__ m) {
  std::fill(m, m + kLanes, -std::numeric_limits<scalar_t>::infinity());
  for (int64_t j = 0; j < F; ++j) {
    scalar_t acc[kLanes] = {};
    for (int64_t d = 0; d < DH; ++d) {
      const scalar_t* __restrict__ qd = qs + (i * DH + d) * kLanes;
      const scalar_t* __restrict__ kd = ks + (j * DH + d) * kLanes;
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += qd[l] * kd[l];
    }
    scalar_t* __restrict__ sj = s + j * kLanes;
    const scalar_t* __restrict__ bj = bias + j * kLanes;
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const scalar_t x = acc[l] * scale + bj[l];  // + -inf at a padded key
      sj[l] = x;
      m[l] = m[l] < x ? x : m[l];  // std::max's branch kept GCC from vectorizing this loop
    }
  }
}

// The lanes' key masks as an additive bias, lane-minor [F, kLanes]: -inf at padded keys, else 0.
template <typename scalar_t>
MSREC_INLINE void lane_bias(const Args<scalar_t>& a, int64_t bh0, int64_t nl, scalar_t* __restrict__ bias) {
  std::fill(bias, bias + a.F * kLanes, scalar_t(0));
  if (a.mask == nullptr) return;
  for (int64_t l = 0; l < nl; ++l) {
    const bool* row = a.mask + ((bh0 + l) / a.H) * a.F;
    for (int64_t j = 0; j < a.F; ++j)
      if (row[j]) bias[j * kLanes + l] = -std::numeric_limits<scalar_t>::infinity();
  }
}

// One group's q, k, v (lane-minor) and key-mask bias.
template <typename scalar_t>
MSREC_INLINE void load_group(const Args<scalar_t>& a, int64_t bh0, int64_t nl, scalar_t* qs, scalar_t* ks,
                             scalar_t* vs, scalar_t* bias) {
  gather_lanes_strided(a.q, a.q_strides, a.H, a.F, a.DH, bh0, nl, qs);
  gather_lanes_strided(a.k, a.k_strides, a.H, a.F, a.DH, bh0, nl, ks);
  gather_lanes_strided(a.v, a.v_strides, a.H, a.F, a.DH, bh0, nl, vs);
  lane_bias(a, bh0, nl, bias);
}

template <typename scalar_t>
MSREC_INLINE void forward_groups(const Args<scalar_t>& a, int64_t g0, int64_t g1, int64_t n_blocks) {
  const int64_t F = a.F, DH = a.DH, FD = F * DH;
  std::vector<scalar_t> buf(4 * FD * kLanes + 3 * F * kLanes);
  scalar_t *qs = buf.data(), *ks = qs + FD * kLanes, *vs = ks + FD * kLanes, *os = vs + FD * kLanes;
  scalar_t *s = os + FD * kLanes, *e = s + F * kLanes, *bias = e + F * kLanes;
  const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t bh0 = g * kLanes, nl = std::min(kLanes, n_blocks - bh0);
    load_group(a, bh0, nl, qs, ks, vs, bias);
    std::fill(os, os + FD * kLanes, scalar_t(0));
    for (int64_t i = 0; i < F; ++i) {
      scalar_t m[kLanes], sum[kLanes] = {}, inv[kLanes];
      lane_scores(qs, ks, bias, i, F, DH, a.scale, s, m);
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) m[l] = m[l] == -inf ? scalar_t(0) : m[l];  // all keys padded: e = 0
      for (int64_t j = 0; j < F; ++j) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          e[j * kLanes + l] = lane_exp(s[j * kLanes + l] - m[l]);  // exp(s - max): one exp per score
          sum[l] += e[j * kLanes + l];
        }
      }
      for (int64_t l = 0; l < kLanes; ++l) {
        inv[l] = sum[l] > 0 ? scalar_t(1) / sum[l] : scalar_t(0);
        if (l < nl) a.lse[(bh0 + l) * F + i] = sum[l] > 0 ? m[l] + std::log(sum[l]) : inf;
      }
      scalar_t* __restrict__ oi = os + i * DH * kLanes;
      for (int64_t j = 0; j < F; ++j) {
        const scalar_t* __restrict__ ej = e + j * kLanes;
        for (int64_t d = 0; d < DH; ++d) {
          const scalar_t* __restrict__ vd = vs + (j * DH + d) * kLanes;
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) oi[d * kLanes + l] += ej[l] * vd[l];
        }
      }
      for (int64_t d = 0; d < DH; ++d) {
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) oi[d * kLanes + l] *= inv[l];
      }
    }
    scatter_lanes(os, bh0, nl, FD, a.out);
  }
}

template <typename scalar_t>
MSREC_INLINE void backward_groups(const Args<scalar_t>& a, int64_t g0, int64_t g1, int64_t n_blocks) {
  const int64_t F = a.F, DH = a.DH, FD = F * DH;
  std::vector<scalar_t> buf(7 * FD * kLanes + 3 * F * kLanes);
  scalar_t *qs = buf.data(), *ks = qs + FD * kLanes, *vs = ks + FD * kLanes, *dos = vs + FD * kLanes;
  scalar_t *dqs = dos + FD * kLanes, *dks = dqs + FD * kLanes, *dvs = dks + FD * kLanes;
  scalar_t *p = dvs + FD * kLanes, *dp = p + F * kLanes, *bias = dp + F * kLanes;
  const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t bh0 = g * kLanes, nl = std::min(kLanes, n_blocks - bh0);
    load_group(a, bh0, nl, qs, ks, vs, bias);
    gather_lanes(a.dout, bh0, nl, FD, dos);
    std::fill(dqs, dqs + 3 * FD * kLanes, scalar_t(0));  // dq, dk, dv
    for (int64_t i = 0; i < F; ++i) {
      scalar_t m[kLanes], lse[kLanes], rowsum[kLanes] = {};
      for (int64_t l = 0; l < kLanes; ++l) lse[l] = l < nl ? a.lse[(bh0 + l) * F + i] : inf;  // empty lane: P = 0
      lane_scores(qs, ks, bias, i, F, DH, a.scale, p, m);
      for (int64_t j = 0; j < F; ++j) {
        scalar_t acc[kLanes] = {};  // dP_ij = <dO_i, V_j>
        for (int64_t d = 0; d < DH; ++d) {
          const scalar_t* __restrict__ dod = dos + (i * DH + d) * kLanes;
          const scalar_t* __restrict__ vd = vs + (j * DH + d) * kLanes;
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) acc[l] += dod[l] * vd[l];
        }
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          const scalar_t pj = lane_exp(p[j * kLanes + l] - lse[l]);  // P_ij = exp(S_ij - lse_i); 0 if lse = inf
          p[j * kLanes + l] = pj;
          dp[j * kLanes + l] = acc[l];
          rowsum[l] += pj * acc[l];
        }
      }
      for (int64_t j = 0; j < F; ++j) {
        scalar_t ds[kLanes];
        const scalar_t* __restrict__ pj = p + j * kLanes;
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) ds[l] = pj[l] * (dp[j * kLanes + l] - rowsum[l]) * a.scale;
        for (int64_t d = 0; d < DH; ++d) {
          const int64_t id = (i * DH + d) * kLanes, jd = (j * DH + d) * kLanes;
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) {
            dqs[id + l] += ds[l] * ks[jd + l];   // dQ_i += dS_ij K_j / sqrt(dh)
            dks[jd + l] += ds[l] * qs[id + l];   // dK_j += dS_ij Q_i / sqrt(dh)
            dvs[jd + l] += pj[l] * dos[id + l];  // dV_j += P_ij dO_i
          }
        }
      }
    }
    scatter_lanes(dqs, bh0, nl, FD, a.dq);
    scatter_lanes(dks, bh0, nl, FD, a.dk);
    scatter_lanes(dvs, bh0, nl, FD, a.dv);
  }
}

MSREC_CLONES void run_forward(const Args<float>& a, int64_t g0, int64_t g1, int64_t n) { forward_groups(a, g0, g1, n); }
MSREC_CLONES void run_forward(const Args<double>& a, int64_t g0, int64_t g1, int64_t n) { forward_groups(a, g0, g1, n); }
MSREC_CLONES void run_backward(const Args<float>& a, int64_t g0, int64_t g1, int64_t n) { backward_groups(a, g0, g1, n); }
MSREC_CLONES void run_backward(const Args<double>& a, int64_t g0, int64_t g1, int64_t n) { backward_groups(a, g0, g1, n); }

template <typename scalar_t>
Args<scalar_t> make_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& mask) {
  Args<scalar_t> a{};
  a.q = q.const_data_ptr<scalar_t>();
  a.k = k.const_data_ptr<scalar_t>();
  a.v = v.const_data_ptr<scalar_t>();
  a.mask = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  a.H = q.size(1), a.F = q.size(2), a.DH = q.size(3);
  for (int i = 0; i < 3; ++i) {
    a.q_strides[i] = q.stride(i), a.k_strides[i] = k.stride(i), a.v_strides[i] = v.stride(i);
  }
  a.scale = scalar_t(1) / std::sqrt(scalar_t(a.DH));
  return a;
}

// q, k, v as they are where their last dim is contiguous (the kernel reads the rest through the
// strides), else a contiguous copy.
at::Tensor rows_contiguous(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

std::optional<at::Tensor> contiguous_mask(const std::optional<at::Tensor>& mask) {
  return mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> field_attention_cpp(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in,
                                                       const std::optional<at::Tensor>& mask_in) {
  check_inputs(q_in, k_in, v_in, mask_in, "msrec::field_attention_cpp");
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const auto mask = contiguous_mask(mask_in);
  const int64_t B = q.size(0), H = q.size(1), F = q.size(2), DH = q.size(3);
  at::Tensor out = at::empty({B, H, F, DH}, q.options());
  at::Tensor lse = at::empty({B, H, F}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "field_attention_cpp", [&] {
    Args<scalar_t> a = make_args<scalar_t>(q, k, v, mask);
    a.out = out.mutable_data_ptr<scalar_t>();
    a.lse = lse.mutable_data_ptr<scalar_t>();
    const int64_t n = B * H, groups = (n + kLanes - 1) / kLanes;
    at::parallel_for(0, groups, grain(F, DH), [&](int64_t g0, int64_t g1) { run_forward(a, g0, g1, n); });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> field_attention_backward_cpp(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& mask_in, const at::Tensor& lse_in) {
  check_inputs(q_in, k_in, v_in, mask_in, "msrec::field_attention_backward_cpp");
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const at::Tensor g = grad_out.contiguous(), lse = lse_in.contiguous();
  const auto mask = contiguous_mask(mask_in);
  const int64_t B = q.size(0), H = q.size(1), F = q.size(2), DH = q.size(3);
  TORCH_CHECK(g.sizes() == q.sizes() && g.scalar_type() == q.scalar_type(),
              "msrec::field_attention_backward_cpp: grad_out must be ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == F &&
                  lse.scalar_type() == q.scalar_type(),
              "msrec::field_attention_backward_cpp: lse must be [B, H, F] in the input dtype, got ", lse.sizes());
  // contiguous, as the kernel writes them (empty_like would keep a strided view's layout)
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "field_attention_backward_cpp", [&] {
    Args<scalar_t> a = make_args<scalar_t>(q, k, v, mask);
    a.dout = g.const_data_ptr<scalar_t>();
    a.lse = const_cast<scalar_t*>(lse.const_data_ptr<scalar_t>());  // read only in backward
    a.dq = dq.mutable_data_ptr<scalar_t>();
    a.dk = dk.mutable_data_ptr<scalar_t>();
    a.dv = dv.mutable_data_ptr<scalar_t>();
    const int64_t n = B * H, groups = (n + kLanes - 1) / kLanes;
    at::parallel_for(0, groups, grain(F, DH), [&](int64_t g0, int64_t g1) { run_backward(a, g0, g1, n); });
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
