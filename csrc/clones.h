// Compile-time helpers shared by the CPU kernels (gate_combine.cpp, field_attention.cpp).
//
// MSREC_CLONES: the per-chunk loops are compiled twice (target_clones: x86-64-v3 = AVX2 + FMA +
// BMI, and the x86-64 baseline) and the loader's resolver picks by CPU *features*, so a build
// runs on any x86-64 and uses AVX2 + FMA wherever they exist; `omp simd` lets the reductions
// vectorize without -ffast-math. (The clone used to be "arch=haswell", whose resolver checks the
// CPU *model* (__builtin_cpu_is): AMD EPYC got the SSE2 baseline, 1.6x slower per call here.)
// ISA-level clones need GCC 12; older GCC clones for "avx2" (features, no FMA contraction).
// MSREC_INLINE: the loops a clone calls are inlined into it, so they get the clone's ISA.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MSREC_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MSREC_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MSREC_CLONES
#endif
#define MSREC_INLINE inline __attribute__((always_inline))
