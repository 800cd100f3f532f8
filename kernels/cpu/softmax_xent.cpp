// fastlm.kernels._cpu_xent: the softmax cross-entropy of one chunk of bf16 logits, and its gradient, in one
// pass over each row while the row is in cache (the CPU half of fastlm.model.fused_loss in bf16).
//
// For rows r in [0, rows) of product (bf16 [rows, vocab], row stride ld), bias (fp32 [vocab] or none) and
// targets (int64 [rows]):
//   x_j       = float(product[r, j]) + bias[j]              (the GEMM's bf16 logits, the bias added in fp32)
//   lse       = max_j x_j + log(sum_j exp(x_j - max))
//   loss[r]   = lse - x_target                              (fp32)
//   g_j       = (exp(x_j - lse) - [j == target]) * scale    (scale = 1 / tokens of the whole batch)
//   product[r, j] = bf16(g_j), rounded to nearest even      (the gradient, in place, for the bf16 GEMMs)
//   d_bias[j]    += sum over rows of g_j                    (fp32, before rounding)
// Rows are split over `threads` threads (threads.h), each with its own fp32 row buffer and d_bias accumulator.
// Nothing here depends on torch: the caller passes addresses and sizes (fastlm/model/cpu_kernels.py).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "threads.h"

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline uint16_t float_to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if (v != v) return 0x7FC0;  // NaN stays NaN (the rounding below could carry it into infinity)
  bits += 0x7FFFu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<uint16_t>(bits >> 16);
}

// exp(x) for x <= 0 (arguments here are x - max): 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p a degree-6
// Taylor polynomial (relative error below 2e-7, under one fp32 ulp at the rounding that follows). Written
// without libm calls so that the compiler vectorises the loops that use it.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // below, exp underflows fp32 anyway; keeps 2^n a normal number
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.42860682030941723212e-6f;  // ln2 in two parts
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t exponent = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return p * scale;
}

struct Chunk {
  uint16_t* product;
  const float* bias;  // may be null
  const int64_t* targets;
  float* losses;
  float* d_bias;  // may be null
  int64_t rows, vocab, ld;
  float scale;
};

// Compiled for AVX-512, AVX2 and baseline x86-64, picked at load time by the CPU (GCC function
// multi-versioning): one build runs everywhere and vectorises as wide as the machine allows.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTLM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTLM_CLONES
#endif

FASTLM_CLONES
void run_rows(const Chunk& c, int64_t begin, int64_t end, float* x, float* d_bias_acc) {
  const int64_t V = c.vocab;
  for (int64_t r = begin; r < end; ++r) {
    uint16_t* row = c.product + r * c.ld;
    // The row's logits in fp32 and their maximum, in one pass (the `omp simd` reductions vectorise without
    // -ffast-math; a NaN may be dropped from the maximum, it still reaches the loss through the sum below).
    float max_x = -INFINITY;
    if (c.bias) {
#pragma omp simd reduction(max : max_x)
      for (int64_t j = 0; j < V; ++j) {
        x[j] = bf16_to_float(row[j]) + c.bias[j];
        max_x = max_x > x[j] ? max_x : x[j];
      }
    } else {
#pragma omp simd reduction(max : max_x)
      for (int64_t j = 0; j < V; ++j) {
        x[j] = bf16_to_float(row[j]);
        max_x = max_x > x[j] ? max_x : x[j];
      }
    }
    const int64_t target = c.targets[r];
    const float x_target = x[target];
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < V; ++j) {
      const float e = exp_nonpositive(x[j] - max_x);
      x[j] = e;
      sum += e;
    }
    c.losses[r] = max_x + std::log(sum) - x_target;
    const float p_scale = c.scale / sum;
    x[target] -= sum;  // (e_t - sum) * scale / sum = (p_t - 1) * scale
    if (d_bias_acc) {
      // `omp simd`: x, d_bias_acc and row never overlap, which GCC could not prove (it left this loop scalar).
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) {
        const float g = x[j] * p_scale;
        d_bias_acc[j] += g;
        row[j] = float_to_bf16(g);
      }
    } else {
      for (int64_t j = 0; j < V; ++j) row[j] = float_to_bf16(x[j] * p_scale);
    }
  }
}

void run_chunk(const Chunk& c, int threads) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, c.rows)));
  const int64_t V = c.vocab;
  // Per thread: a row buffer, and (with a bias) a d_bias accumulator added to the output after the join.
  std::vector<float> scratch(static_cast<size_t>(threads) * V * (c.d_bias ? 2 : 1), 0.0f);
  auto work = [&](int t) {
    const int64_t begin = c.rows * t / threads, end = c.rows * (t + 1) / threads;
    float* x = scratch.data() + static_cast<size_t>(t) * V;
    float* acc = c.d_bias ? scratch.data() + static_cast<size_t>(threads + t) * V : nullptr;
    run_rows(c, begin, end, x, acc);
  };
  fastlm_native::in_threads(threads, work);
  if (c.d_bias) {
    for (int t = 0; t < threads; ++t) {
      const float* acc = scratch.data() + static_cast<size_t>(threads + t) * V;
      for (int64_t j = 0; j < V; ++j) c.d_bias[j] += acc[j];
    }
  }
}

}  // namespace

namespace fastlm_native {

// softmax_xent_rows(product, bias, targets, losses, d_bias, rows, vocab, ld, scale, threads): addresses as
// Python ints (0 for no bias / no d_bias). Releases the GIL while it computes.
PyObject* softmax_xent_rows(PyObject*, PyObject* args) {
  unsigned long long product, bias, targets, losses, d_bias;
  long long rows, vocab, ld;
  float scale;
  int threads;
  if (!PyArg_ParseTuple(args, "KKKKKLLLfi", &product, &bias, &targets, &losses, &d_bias, &rows, &vocab, &ld,
                        &scale, &threads)) {
    return nullptr;
  }
  if (rows < 0 || vocab <= 0 || ld < vocab || threads < 1) {
    PyErr_SetString(PyExc_ValueError, "softmax_xent_rows: rows >= 0, 0 < vocab <= ld and threads >= 1 expected");
    return nullptr;
  }
  const Chunk c{reinterpret_cast<uint16_t*>(product), reinterpret_cast<const float*>(bias),
                reinterpret_cast<const int64_t*>(targets), reinterpret_cast<float*>(losses),
                reinterpret_cast<float*>(d_bias), rows, vocab, ld, scale};
  Py_BEGIN_ALLOW_THREADS
  run_chunk(c, threads);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

}  // namespace fastlm_native
