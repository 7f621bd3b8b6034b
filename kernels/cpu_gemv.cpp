// attamba::gemv: y = x W^T for fp32 rows x [M, K] (a decode batch) and fp16 or bf16 weights W [N, K], fp32 out [M, N]
// (kernels/cpu_gemv.py says why and when). AVX2 + F16C + FMA; K a multiple of 16.
#include <immintrin.h>

#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

// 8 weights -> 8 floats: F16C for fp16; for bf16 the 16 bits are the float's upper half
template <bool BF16>
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    return _mm256_cvtph_ps(h);
  }
}

inline float hsum(__m256 s) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_hadd_ps(h, h);
  h = _mm_hadd_ps(h, h);
  return _mm_cvtss_f32(h);
}

// G rows of x against one weight row: each 16 weights are converted once for the G rows, two FMA chains a row
// (2G accumulators and 2 weight registers of AVX2's 16)
template <bool BF16, int G>
inline void dot_rows(const float* x, const uint16_t* row, float* y, int64_t K, int64_t N) {
  __m256 a0[G], a1[G];
  for (int g = 0; g < G; ++g) {
    a0[g] = _mm256_setzero_ps();
    a1[g] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < K; k += 16) {
    const __m256 w0 = load8<BF16>(row + k), w1 = load8<BF16>(row + k + 8);
    for (int g = 0; g < G; ++g) {
      a0[g] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + g * K + k), a0[g]);
      a1[g] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + g * K + k + 8), a1[g]);
    }
  }
  for (int g = 0; g < G; ++g) y[g * N] = hsum(_mm256_add_ps(a0[g], a1[g]));
}

// Weight rows in blocks of ~16 KB, one row after another (one stream a thread for the prefetcher: blocking 4 rows
// measured slower); a block is read from memory once, for the first group of four rows of x, and from L1 for the
// others (x itself does not fit in L1 for a large batch: 32 rows at K = 576 are 73 KB). A row's sum is the same
// whatever its group or block.
template <bool BF16>
void rows(const float* x, const uint16_t* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t block = std::max<int64_t>(1, (16 << 10) / (2 * K));
  for (int64_t b0 = n0; b0 < n1; b0 += block) {
    const int64_t b1 = std::min(b0 + block, n1);
    for (int64_t m = 0; m < M; m += 4) {
      const float* xg = x + m * K;
      for (int64_t n = b0; n < b1; ++n) {
        const uint16_t* row = w + n * K;
        float* yg = y + m * N + n;
        switch (std::min<int64_t>(M - m, 4)) {
          case 4: dot_rows<BF16, 4>(xg, row, yg, K, N); break;
          case 3: dot_rows<BF16, 3>(xg, row, yg, K, N); break;
          case 2: dot_rows<BF16, 2>(xg, row, yg, K, N); break;
          default: dot_rows<BF16, 1>(xg, row, yg, K, N); break;
        }
      }
    }
  }
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "attamba::gemv: x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "attamba::gemv: x must be float32");
  TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16, "attamba::gemv: w must be fp16/bf16");
  TORCH_CHECK(x.size(1) % 16 == 0, "attamba::gemv: K must be a multiple of 16");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  at::Tensor y = at::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const uint16_t* wp = static_cast<const uint16_t*>(wc.data_ptr());
  float* yp = y.data_ptr<float>();
  const bool bf16 = wc.scalar_type() == at::kBFloat16;
  // rows per task: ~64 KB of fp16 weights at K = 576, so a 576-row product still splits across two threads
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (bf16) {
      rows<true>(xp, wp, yp, M, K, N, n0, n1);
    } else {
      rows<false>(xp, wp, yp, M, K, N, n0, n1);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(attamba, m) { m.def("gemv(Tensor x, Tensor w) -> Tensor"); }

TORCH_LIBRARY_IMPL(attamba, CPU, m) { m.impl("gemv", &gemv); }
