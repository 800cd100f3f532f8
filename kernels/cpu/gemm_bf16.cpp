// fastlm.kernels._cpu_xent.gemm_bf16_f32: C = A @ B (or C += A @ B) for bf16 A [m, k] and B [k, n] into fp32 C,
// on AVX512-BF16 (VDPBF16PS: fp32 products of bf16 pairs, summed in fp32), with no rounding of C to bf16.
// torch's bf16 GEMM on CPU returns bf16, a last rounding of the decoder's gradients dh and dW that no long sum
// averages out (docs/semantics.md, "The fused decoder and loss"), and torch has no CPU GEMM with bf16 inputs and
// an fp32 output. fastlm/model/cpu_kernels.py calls it only where the CPU has AVX512-BF16.
//
// Layout. VDPBF16PS multiplies pairs of bf16 along k: lane l of the result gets a[2q] b[2q] + a[2q+1] b[2q+1]
// for the 32-bit pair q of each operand. So both operands are read as "pair words" (two bf16 of consecutive k
// in one 32-bit word):
// - B is packed once per call into 16-column blocks: Bp[(block * pairs + q) * 16 + lane] = (B[2q, j], B[2q+1, j])
//   for j = 16 block + lane, zero past n and past k (an odd k's last pair).
// - A is read in place when its rows are contiguous and k is even (each pair word is one 32-bit load: dh's
//   gradient rows), else packed per block of MC rows as Ap[q * MC + row] (dW's transposed gradient, whose
//   pairs sit in two rows of memory).
// The micro-kernel keeps an R x (16 NV) tile of C in registers (R <= 8 rows, NV <= 2 vectors), broadcasts one
// A pair word per row and multiplies it with NV packed B vectors per pair. C's columns go in panels and K in
// blocks such that one panel's packed B for one K block fits in L2; rows are split over threads.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "threads.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTLM_HAVE_BF16_GEMM 1
#include <immintrin.h>
#else
#define FASTLM_HAVE_BF16_GEMM 0
#endif

namespace fastlm_native {

bool cpu_has_avx512_bf16() {
#if FASTLM_HAVE_BF16_GEMM
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

namespace {

struct Gemm {
  const uint16_t* a;  // A[i, p] = a[i * sa0 + p * sa1] (elements)
  int64_t sa0, sa1;
  const uint16_t* b;  // B[p, j] = b[p * sb0 + j * sb1]
  int64_t sb0, sb1;
  float* c;  // C[i, j] = c[i * ldc + j]
  int64_t ldc, m, n, k;
  bool accumulate;
};

constexpr int LANES = 16;     // fp32 lanes of one vector: the columns of a packed B block
constexpr int MR = 8;         // rows of the micro-kernel's tile
constexpr int64_t MC = 64;    // rows of a packed A block
constexpr int64_t L2_BYTES = 384 * 1024;  // packed B per K block and panel: stays in L2 beside the rows of C
constexpr int64_t PANEL_BLOCKS = 48;      // column blocks (of LANES) a panel is sized for when n is wide

// Two bf16 as one pair word: the first (even k) in the low half, as VDPBF16PS reads it.
inline uint32_t pair_word(uint16_t even, uint16_t odd) { return uint32_t(even) | (uint32_t(odd) << 16); }

#if FASTLM_HAVE_BF16_GEMM
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

// Pair rows [q_begin, q_end) of B into Bp (see the file's comment).
void pack_b(const Gemm& g, uint32_t* bp, int64_t pairs, int64_t q_begin, int64_t q_end) {
  const int64_t blocks = (g.n + LANES - 1) / LANES;
  for (int64_t q = q_begin; q < q_end; ++q) {
    const uint16_t* even = g.b + 2 * q * g.sb0;
    const bool has_odd = 2 * q + 1 < g.k;
    const uint16_t* odd = g.b + (has_odd ? 2 * q + 1 : 2 * q) * g.sb0;
    for (int64_t block = 0; block < blocks; ++block) {
      uint32_t* out = bp + (block * pairs + q) * LANES;
      const int64_t j0 = block * LANES;
      if (j0 + LANES <= g.n && g.sb1 == 1 && has_odd) {  // the common case, vectorised
        for (int l = 0; l < LANES; ++l) out[l] = pair_word(even[j0 + l], odd[j0 + l]);
        continue;
      }
      for (int l = 0; l < LANES; ++l) {
        const int64_t j = j0 + l;
        out[l] = j < g.n ? pair_word(even[j * g.sb1], has_odd ? odd[j * g.sb1] : 0) : 0;
      }
    }
  }
}

// Pair words of A's rows [i0, i0 + rows) and pairs [q0, q0 + pairs) into ap[q * MC + row].
void pack_a(const Gemm& g, uint32_t* ap, int64_t i0, int64_t rows, int64_t q0, int64_t pairs) {
  for (int64_t q = 0; q < pairs; ++q) {
    const int64_t p = 2 * (q0 + q);
    const bool has_odd = p + 1 < g.k;
    const uint16_t* even = g.a + i0 * g.sa0 + p * g.sa1;
    const uint16_t* odd = has_odd ? even + g.sa1 : even;
    uint32_t* out = ap + q * MC;
    if (g.sa0 == 1 && has_odd) {  // transposed A: two contiguous rows of memory, vectorised
      for (int64_t r = 0; r < rows; ++r) out[r] = pair_word(even[r], odd[r]);
    } else {
      for (int64_t r = 0; r < rows; ++r) out[r] = pair_word(even[r * g.sa0], has_odd ? odd[r * g.sa0] : 0);
    }
  }
}

// C[R rows, 16 NV columns] (+)= A pair words x packed B over `pairs` pairs. a: the first row's first pair
// word, a_row / a_pair: byte steps between rows / pairs; b: the first block's first pair, b_block: words
// between blocks; valid: columns of the last vector that exist in C.
template <int R, int NV>
void micro(const char* a, int64_t a_row, int64_t a_pair, const uint32_t* b, int64_t b_block, int64_t pairs,
           float* c, int64_t ldc, int valid, bool load_c) {
  __m512 acc[R][NV];
  const __mmask16 last = valid >= LANES ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mask = v == NV - 1 ? last : __mmask16(0xFFFF);
      acc[r][v] = load_c ? _mm512_maskz_loadu_ps(mask, c + r * ldc + v * LANES) : _mm512_setzero_ps();
    }
  }
  for (int64_t q = 0; q < pairs; ++q) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + v * b_block + q * LANES);
    for (int r = 0; r < R; ++r) {
      int32_t word;
      std::memcpy(&word, a + r * a_row + q * a_pair, sizeof(word));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(word);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mask = v == NV - 1 ? last : __mmask16(0xFFFF);
      _mm512_mask_storeu_ps(c + r * ldc + v * LANES, mask, acc[r][v]);
    }
  }
}

using Micro = void (*)(const char*, int64_t, int64_t, const uint32_t*, int64_t, int64_t, float*, int64_t, int, bool);

template <int R>
constexpr Micro pick(int nv) { return nv == 2 ? micro<R, 2> : micro<R, 1>; }

Micro micro_for(int rows, int nv) {
  switch (rows) {
    case 1: return pick<1>(nv);
    case 2: return pick<2>(nv);
    case 3: return pick<3>(nv);
    case 4: return pick<4>(nv);
    case 5: return pick<5>(nv);
    case 6: return pick<6>(nv);
    case 7: return pick<7>(nv);
    default: return pick<8>(nv);
  }
}

// Rows [row_begin, row_end) of C, every column, over all of K: panel by panel of `panel_blocks` column blocks,
// so that a panel's packed B for one K block stays in L2 while the rows go by, and C is read back only per
// K block of its own panel (at the logits' wide n, whole rows of C per K block overflowed every cache).
void compute_rows(const Gemm& g, const uint32_t* bp, int64_t pairs, int64_t block_pairs, int64_t panel_blocks,
                  int64_t row_begin, int64_t row_end) {
  const int64_t blocks = (g.n + LANES - 1) / LANES;
  const bool direct_a = g.sa1 == 1 && g.k % 2 == 0;
  std::vector<uint32_t> ap(direct_a ? 0 : static_cast<size_t>(MC * block_pairs));
  for (int64_t panel = 0; panel < blocks; panel += panel_blocks) {
    const int64_t panel_end = std::min(blocks, panel + panel_blocks);
    for (int64_t q0 = 0; q0 < pairs; q0 += block_pairs) {
      const int64_t qn = std::min(block_pairs, pairs - q0);
      const bool load_c = g.accumulate || q0 > 0;
      for (int64_t i0 = row_begin; i0 < row_end; i0 += MC) {
        const int64_t rows = std::min(MC, row_end - i0);
        if (!direct_a) pack_a(g, ap.data(), i0, rows, q0, qn);
        for (int64_t i = 0; i < rows; i += MR) {
          const int r = static_cast<int>(std::min<int64_t>(MR, rows - i));
          const char* a;
          int64_t a_row, a_pair;
          if (direct_a) {
            a = reinterpret_cast<const char*>(g.a + (i0 + i) * g.sa0 + 2 * q0);
            a_row = g.sa0 * 2;
            a_pair = 4;
          } else {
            a = reinterpret_cast<const char*>(ap.data() + i);
            a_row = 4;
            a_pair = MC * 4;
          }
          for (int64_t block = panel; block < panel_end; block += 2) {
            const int nv = static_cast<int>(std::min<int64_t>(2, panel_end - block));
            const int valid = static_cast<int>(std::min<int64_t>(LANES, g.n - (block + nv - 1) * LANES));
            micro_for(r, nv)(a, a_row, a_pair, bp + (block * pairs + q0) * LANES, pairs * LANES, qn,
                             g.c + (i0 + i) * g.ldc + block * LANES, g.ldc, valid, load_c);
          }
        }
      }
    }
  }
}

#pragma GCC pop_options

void run_gemm(const Gemm& g, int threads) {
  const int64_t pairs = (g.k + 1) / 2, blocks = (g.n + LANES - 1) / LANES;
  // Kept from call to call on the calling thread: a fresh buffer of megabytes would be page-faulted in anew.
  // (Worker threads name it through `packed`: inside them `buffer` would be their own, empty, thread_local.)
  thread_local std::vector<uint32_t> buffer;
  buffer.resize(static_cast<size_t>(blocks * pairs * LANES));
  uint32_t* packed = buffer.data();
  const int pack_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, pairs)));
  in_threads(pack_threads, [&](int t) {
    pack_b(g, packed, pairs, pairs * t / pack_threads, pairs * (t + 1) / pack_threads);
  });
  // K blocks sized for a panel of at most PANEL_BLOCKS column blocks in L2; the panel then as wide as L2 holds
  // at that K block (dh and dW, n = H: one panel, as before panels existed; the logits, n = V: ~60 blocks).
  const int64_t block_pairs = std::max<int64_t>(
      16, std::min<int64_t>(pairs, L2_BYTES / (std::min(blocks, PANEL_BLOCKS) * LANES * 4)));
  const int64_t panel_blocks = std::max<int64_t>(2, L2_BYTES / (block_pairs * LANES * 4)) / 2 * 2;
  // Rows split in whole tiles of MR so that no thread gets a ragged tile in the middle.
  const int64_t tiles = (g.m + MR - 1) / MR;
  const int row_threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
  in_threads(row_threads, [&](int t) {
    const int64_t begin = std::min(g.m, tiles * t / row_threads * MR);
    const int64_t end = std::min(g.m, tiles * (t + 1) / row_threads * MR);
    compute_rows(g, packed, pairs, block_pairs, panel_blocks, begin, end);
  });
}
#endif  // FASTLM_HAVE_BF16_GEMM

}  // namespace

// gemm_bf16_f32(a, sa0, sa1, b, sb0, sb1, c, ldc, m, n, k, accumulate, threads): addresses as Python ints,
// strides in elements. The caller checks that the CPU has AVX512-BF16 (cpu_has_avx512_bf16). Releases the GIL.
PyObject* gemm_bf16_f32(PyObject*, PyObject* args) {
  unsigned long long a, b, c;
  long long sa0, sa1, sb0, sb1, ldc, m, n, k;
  int accumulate, threads;
  if (!PyArg_ParseTuple(args, "KLLKLLKLLLLii", &a, &sa0, &sa1, &b, &sb0, &sb1, &c, &ldc, &m, &n, &k, &accumulate,
                        &threads)) {
    return nullptr;
  }
  if (m < 0 || n < 0 || k < 0 || ldc < n || threads < 1) {
    PyErr_SetString(PyExc_ValueError, "gemm_bf16_f32: m, n, k >= 0, ldc >= n and threads >= 1 expected");
    return nullptr;
  }
#if FASTLM_HAVE_BF16_GEMM
  if (!cpu_has_avx512_bf16()) {
    PyErr_SetString(PyExc_RuntimeError, "gemm_bf16_f32: this CPU has no AVX512-BF16");
    return nullptr;
  }
  const Gemm g{reinterpret_cast<const uint16_t*>(a), sa0, sa1, reinterpret_cast<const uint16_t*>(b), sb0, sb1,
               reinterpret_cast<float*>(c), ldc, m, n, k, accumulate != 0};
  Py_BEGIN_ALLOW_THREADS
  if (m > 0 && n > 0) {
    if (k == 0) {
      if (!g.accumulate) {
        for (int64_t i = 0; i < m; ++i) std::fill(g.c + i * ldc, g.c + i * ldc + n, 0.0f);
      }
    } else {
      run_gemm(g, threads);
    }
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
#else
  PyErr_SetString(PyExc_RuntimeError, "gemm_bf16_f32: built without x86-64 AVX-512 support");
  return nullptr;
#endif
}

PyObject* has_avx512_bf16(PyObject*, PyObject*) { return PyBool_FromLong(cpu_has_avx512_bf16()); }

}  // namespace fastlm_native
