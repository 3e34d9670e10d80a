// Vectorizable math shared by the CPU kernels (gate_combine.cpp, field_attention.cpp).
//
// lane_exp(x): exp for a loop over SIMD lanes. fp32: the Cephes expf polynomial (relative error
// about 1e-7, as std::exp within 2 ulp) with the power of two built in the exponent bits, so a
// loop over lanes runs 8 wide under AVX2 (a libm call per value would not vectorize, and costs
// ~10 ns a call: gate_combine's per-sample softmax spent most of its time in expf); x below
// -87.3 (masked logits: -inf) gives 0, NaN stays NaN. fp64 (gradcheck) keeps std::exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "clones.h"

namespace msrec {

MSREC_INLINE float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2), branch-free
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;                // x - n ln 2, |r| <= ln2 / 2
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float pow2 = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);  // 2^n
  const float keep = x >= -87.3f ? 1.0f : 0.0f;  // a blend, not a branch
  return y * pow2 * keep;
}

MSREC_INLINE float lane_exp(float x) { return exp_approx(x); }
MSREC_INLINE double lane_exp(double x) { return std::exp(x); }

}  // namespace msrec
