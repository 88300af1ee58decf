// One rollout step r S_i on the CPU (paper Eq. 2) without writing score tiles to memory.
//
// S_i = mean_h softmax(scale q kᵀ). With the softmax normalisers lse that the forward's flash kernel returned,
// (r S_i)_j = mean_h Σ_t r_t 2^(log₂e (scale q_t·k_j − lse_t)). The work is cut into (image, head, chunk of
// query rows) items, spread evenly over the intra-op threads; for each item one BLAS GEMM writes the chunk's
// scores (base 2, log₂e riding on alpha) into a per-thread tile small enough to stay in L2, and one pass over it
// adds the normaliser, takes exp2 (SLEEF's 1-ULP exp2, the one torch's exp2_ uses) and accumulates r_t · 2^s
// into a per-part row of T floats: the tile is read once, from cache. Python (dcal.model.fused_rollout) builds
// this file on first use and falls back to the eager tiles when it cannot.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

extern "C" {
// Single-precision GEMM (column-major BLAS), exported by the BLAS inside libtorch_cpu (MKL on x86-64 wheels).
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
// SLEEF's 8-wide exp2 (1.0 ULP), exported by libtorch_cpu; Vectorized<float>::exp2 runs it under AVX2.
__m256 Sleef_exp2f8_u10(__m256 x);
}

namespace {

constexpr float kLog2e = 1.4426950408889634f;

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "dcal_rollout: ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

at::Tensor left_multiply(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const at::Tensor& row,
                         double scale, int64_t chunk_rows) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes(), "dcal_rollout: q and k must both be (B, H, T, d), got ",
              q.sizes(), " and ", k.sizes());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == T,
              "dcal_rollout: lse must be (B, H, T) = (", B, ", ", H, ", ", T, "), got ", lse.sizes());
  TORCH_CHECK(row.dim() == 2 && row.size(0) == B && row.size(1) == T, "dcal_rollout: row must be (B, T) = (", B,
              ", ", T, "), got ", row.sizes());
  check_float_cpu(q, "q");
  check_float_cpu(k, "k");
  check_float_cpu(lse, "lse");
  check_float_cpu(row, "row");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1, "dcal_rollout: q and k need unit stride along d, got ",
              q.strides(), " and ", k.strides());
  TORCH_CHECK(chunk_rows >= 1, "dcal_rollout: chunk_rows must be >= 1, got ", chunk_rows);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(T * 8 < kIntMax && d < kIntMax && q.stride(2) < kIntMax && k.stride(2) < kIntMax && T > 0 && d > 0,
              "dcal_rollout: sizes and row strides must fit BLAS's 32-bit integers, got ", q.sizes(), " ",
              q.strides(), " ", k.strides());

  const int64_t ld = (T + 7) / 8 * 8;  // tile row length: whole 8-float vectors (the padding lanes are discarded)
  const int64_t chunks = (T + chunk_rows - 1) / chunk_rows;
  const int64_t items = B * H * chunks;
  // Parts, not threads, own the accumulators: part p takes items [p·n/P, (p+1)·n/P), whichever thread runs it.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  std::vector<float> partial(parts * B * ld, 0.f);

  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* lp = lse.const_data_ptr<float>();
  const float* rp = row.const_data_ptr<float>();
  const float alpha = static_cast<float>(scale) * kLog2e;
  const float beta = 0.f;
  const int m = static_cast<int>(T), kd = static_cast<int>(d), ldc = static_cast<int>(ld);
  const int lda = static_cast<int>(k.stride(2)), ldb = static_cast<int>(q.stride(2));

  at::parallel_for(0, parts, 1, [&](int64_t part_begin, int64_t part_end) {
    // One tile per thread, kept between calls (a fresh one would be fresh pages every call).
    thread_local std::vector<float> tile;
    if (tile.size() < static_cast<size_t>(chunk_rows * ld)) tile.assign(chunk_rows * ld, 0.f);
    for (int64_t p = part_begin; p < part_end; ++p) {
      float* acc_part = partial.data() + p * B * ld;
      for (int64_t item = p * items / parts; item < (p + 1) * items / parts; ++item) {
        const int64_t c = item % chunks, bh = item / chunks, b = bh / H, h = bh % H;
        const int64_t s = c * chunk_rows;
        const int n = static_cast<int>(std::min(chunk_rows, T - s));
        // tile (n rows of ld) = alpha · q[s:s+n] kᵀ, as the column-major (T x n) product kᵀ-by-rows · q-chunk
        sgemm_("T", "N", &m, &n, &kd, &alpha, kp + b * k.stride(0) + h * k.stride(1), &lda,
               qp + b * q.stride(0) + h * q.stride(1) + s * q.stride(2), &ldb, &beta, tile.data(), &ldc);
        float* acc = acc_part + b * ld;
        const float* lse_bh = lp + b * lse.stride(0) + h * lse.stride(1);
        const float* row_b = rp + b * row.stride(0);
        for (int i = 0; i < n; ++i) {
          const __m256 bias = _mm256_set1_ps(-kLog2e * lse_bh[(s + i) * lse.stride(2)]);
          const __m256 weight = _mm256_set1_ps(row_b[(s + i) * row.stride(1)]);
          const float* scores = tile.data() + i * ld;
          for (int64_t j = 0; j < ld; j += 8) {
            const __m256 probs = Sleef_exp2f8_u10(_mm256_add_ps(_mm256_loadu_ps(scores + j), bias));
            _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(weight, probs, _mm256_loadu_ps(acc + j)));
          }
        }
      }
    }
  });

  at::Tensor out = at::empty({B, T}, q.options());
  float* op = out.mutable_data_ptr<float>();
  const float inv_heads = 1.f / static_cast<float>(H);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t j = 0; j < T; ++j) {
      float sum = 0.f;
      for (int64_t p = 0; p < parts; ++p) sum += partial[(p * B + b) * ld + j];
      op[b * T + j] = sum * inv_heads;
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(dcal_rollout, m) {
  m.def("left_multiply(Tensor q, Tensor k, Tensor lse, Tensor row, float scale, int chunk_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(dcal_rollout, CPU, m) { m.impl("left_multiply", &left_multiply); }
