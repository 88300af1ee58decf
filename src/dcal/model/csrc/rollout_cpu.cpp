// The rollout's CPU kernels (paper Eq. 2): attention_mean, one SA block's output and head-mean probabilities in
// one pass (inference), and left_multiply, one rollout step r S_i from queries, keys and normalisers (training).
//
// left_multiply: S_i = mean_h softmax(scale q kᵀ). With the softmax normalisers lse that the forward's flash kernel returned,
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


// One SA block's attention output and its head-mean probabilities in one pass (inference with the rollout):
// per (image, chunk of query rows), for each head one GEMM writes the chunk's scores (base 2) into a per-thread
// tile that stays in L2, one pass takes the row max, one exp2 (the polynomial above) and the row sums, one adds
// p / H into the block's
// mean map (B, T, T), and a second GEMM gives the unnormalised P V, scaled by 1 / row sum. QKᵀ runs once: the
// rollout later reads the mean maps instead of recomputing the scores.
// 2^x for x <= 0 (scores minus their row maximum): Cephes' exp2f polynomial on the fraction (about 2 ULP), the
// integer part added to the exponent bits; below -125 the result is 2^-125 (next to a row sum >= 1 it is
// nothing), a NaN stays NaN. Cheaper than SLEEF's full-range exp2 in the one-pass attention's inner loop.
inline __m256 exp2_nonpositive(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-125.f), x);  // max_ps returns its second operand for a NaN
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), e));
}

at::Tensor attention_mean(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                          int64_t chunk_rows, at::Tensor& mean) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "dcal_attention_mean: q, k and v must all be (B, H, T, d), got ", q.sizes(), ", ", k.sizes(), " and ",
              v.sizes());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), d = q.size(3);
  check_float_cpu(q, "q");
  check_float_cpu(k, "k");
  check_float_cpu(v, "v");
  check_float_cpu(mean, "mean");
  TORCH_CHECK(mean.dim() == 3 && mean.size(0) == B && mean.size(1) == T && mean.size(2) == T && mean.is_contiguous(),
              "dcal_attention_mean: mean must be a contiguous (B, T, T) = (", B, ", ", T, ", ", T, ") tensor, got ",
              mean.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "dcal_attention_mean: q, k and v need unit stride along d, got ", q.strides(), ", ", k.strides(),
              " and ", v.strides());
  TORCH_CHECK(chunk_rows >= 1, "dcal_attention_mean: chunk_rows must be >= 1, got ", chunk_rows);
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(T > 0 && d > 0 && T * 8 < kIntMax && H * d < kIntMax && q.stride(2) < kIntMax &&
                  k.stride(2) < kIntMax && v.stride(2) < kIntMax,
              "dcal_attention_mean: sizes and row strides must fit BLAS's 32-bit integers, got ", q.sizes());

  const int64_t ld = (T + 7) / 8 * 8;  // tile row length: whole 8-float vectors, padding lanes set to -inf
  const int64_t vec_end = T / 8 * 8;   // the mean map's rows are T long: vectors up to here, then a scalar tail
  const int64_t chunks = (T + chunk_rows - 1) / chunk_rows;
  // (B, T, H, d) memory: the (B, H, T, d) view returned below transposes back to timm's (B, T, H·d) for free
  at::Tensor out = at::empty({B, T, H, d}, q.options());
  float* op = out.mutable_data_ptr<float>();
  float* mp = mean.mutable_data_ptr<float>();
  const float* qp = q.const_data_ptr<float>();
  const float* kp = k.const_data_ptr<float>();
  const float* vp = v.const_data_ptr<float>();
  const float alpha = static_cast<float>(scale) * kLog2e, one = 1.f, zero = 0.f;
  const float inv_heads = 1.f / static_cast<float>(H);
  const int m = static_cast<int>(T), kd = static_cast<int>(d), ldt = static_cast<int>(ld);
  const int ldk = static_cast<int>(k.stride(2)), ldq = static_cast<int>(q.stride(2));
  const int ldv = static_cast<int>(v.stride(2)), ldo = static_cast<int>(H * d);
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());

  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> tile, inv_sum;
    if (tile.size() < static_cast<size_t>(chunk_rows * ld)) tile.assign(chunk_rows * ld, 0.f);
    if (inv_sum.size() < static_cast<size_t>(chunk_rows)) inv_sum.assign(chunk_rows, 0.f);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, s = item % chunks * chunk_rows;
      const int n = static_cast<int>(std::min(chunk_rows, T - s));
      for (int64_t h = 0; h < H; ++h) {
        sgemm_("T", "N", &m, &n, &kd, &alpha, kp + b * k.stride(0) + h * k.stride(1), &ldk,
               qp + b * q.stride(0) + h * q.stride(1) + s * q.stride(2), &ldq, &zero, tile.data(), &ldt);
        for (int i = 0; i < n; ++i) {
          float* row = tile.data() + i * ld;
          for (int64_t j = T; j < ld; ++j) row[j] = -std::numeric_limits<float>::infinity();
          __m256 vmax = neg_inf;
          for (int64_t j = 0; j < ld; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(row + j));
          alignas(32) float lanes[8];
          _mm256_store_ps(lanes, vmax);
          const float mx = *std::max_element(lanes, lanes + 8);
          const __m256 shift = _mm256_set1_ps(-mx);
          __m256 vsum = _mm256_setzero_ps();
          for (int64_t j = 0; j < ld; j += 8) {
            const __m256 e = exp2_nonpositive(_mm256_add_ps(_mm256_loadu_ps(row + j), shift));
            _mm256_storeu_ps(row + j, e);
            vsum = _mm256_add_ps(vsum, e);
          }
          _mm256_store_ps(lanes, vsum);
          float sum = 0.f;
          for (float lane : lanes) sum += lane;
          const float w = 1.f / sum;
          inv_sum[i] = w;
          const float wm = w * inv_heads;
          const __m256 vw = _mm256_set1_ps(wm);
          float* mrow = mp + (b * T + s + i) * T;
          if (h == 0) {
            int64_t j = 0;
            for (; j < vec_end; j += 8) _mm256_storeu_ps(mrow + j, _mm256_mul_ps(vw, _mm256_loadu_ps(row + j)));
            for (; j < T; ++j) mrow[j] = wm * row[j];
          } else {
            int64_t j = 0;
            for (; j < vec_end; j += 8)
              _mm256_storeu_ps(mrow + j, _mm256_fmadd_ps(vw, _mm256_loadu_ps(row + j), _mm256_loadu_ps(mrow + j)));
            for (; j < T; ++j) mrow[j] += wm * row[j];
          }
        }
        // out[b, s:s+n, h] = (e V) / row sums: column-major d x n = Vᵀ (d x T) · eᵀ (T x n)
        float* o = op + ((b * T + s) * H + h) * d;
        sgemm_("N", "N", &kd, &n, &m, &one, vp + b * v.stride(0) + h * v.stride(1), &ldv, tile.data(), &ldt, &zero,
               o, &ldo);
        for (int i = 0; i < n; ++i) {
          float* orow = o + i * H * d;
          for (int64_t j = 0; j < d; ++j) orow[j] *= inv_sum[i];
        }
      }
    }
  });
  return out.permute({0, 2, 1, 3});
}

}  // namespace

TORCH_LIBRARY(dcal_rollout, m) {
  m.def("left_multiply(Tensor q, Tensor k, Tensor lse, Tensor row, float scale, int chunk_rows) -> Tensor");
  m.def("attention_mean(Tensor q, Tensor k, Tensor v, float scale, int chunk_rows, Tensor(a!) mean) -> Tensor");
}

TORCH_LIBRARY_IMPL(dcal_rollout, CPU, m) {
  m.impl("left_multiply", &left_multiply);
  m.impl("attention_mean", &attention_mean);
}
