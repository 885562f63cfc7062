// Exact nearest-code search on CPU: a bf16 GEMM (oneDNN brgemm on AMX, else MKL) proposes
// candidates, a rounding-error bound makes the candidate set provably contain the winner, and
// an fp32 re-score picks among them.
//
// Ranking scores (maximised, as in vq_torchrec.quantization.distances.nearest_codes):
//   l2:     2 x . c_j - ||c_j||^2        cosine: x . c_j
// Both are computed on shifted vectors x' = x - mu, c'_j = c_j - mu (mu = codebook mean), which
// changes every code's score of a row by the same amount:
//   p_j = a x' . c'_j + b_j,   l2: a = 2, b_j = -||c'_j||^2;   cosine: a = 1, b_j = mu . c'_j.
// The shift keeps the numbers small (no cancellation of large ||x||^2, ||c||^2 terms), so the
// fp32 re-score of p_j is at least as accurate as the unshifted fp32 GEMM of nearest_codes.
// The bf16 GEMM scores q_j = a bf16(x') . bf16(c'_j) + b_j (unit roundoff u = 2^-8, fp32
// accumulation) satisfy |q_j - p_j| <= e_j = a kappa ||x'|| ||c'_j|| + eps_row, and the fp32
// re-score differs from p_j by at most eps_row plus a gamma_d share of kappa. Every code with
// q_j + e_j >= T, where T = max_k (q_k - e_k), is a candidate, so the winner of the fp32
// re-score always is one. Candidates are re-scored in fp32 and the best wins (lowest index on
// ties); its returned score is the unshifted one (2 x . c - ||c||^2 or x . c, with
// x . c = x' . c + mu . c), as the loss uses it. Rows with more than `max_candidates`
// candidates are re-scored against every code;
// rows with a non-finite value, and every row when the codebook has one, follow torch.max over
// the unshifted fp32 scores (the first NaN wins, else the first maximum).
//
// Interface (registered as torch.ops.vq_torchrec.certified_search):
//   x (N, d) fp32, last dim contiguous; codebook (K, d) fp32; index: optional (M,) int64 rows
//   of x to search (else all N: M = N); returns codes (M,) int64, winning scores (M,) fp32
//   and a (2,) int64 tensor of statistics: candidates re-scored in total, rows re-scored
//   against every code.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <ATen/native/CPUBlas.h>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

extern "C" {
// MKL's bf16 x bf16 -> fp32 GEMM (linked into libtorch_cpu). CBLAS enums are int-sized.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc);
}

namespace {

constexpr int kRowMajor = 101;
constexpr int kNoTrans = 111;
constexpr int kTrans = 112;
constexpr int64_t kTile = 64;  // brgemm output columns per call
constexpr int64_t kPrefetch = 16;  // rows prefetched ahead in the row preparation

inline uint16_t to_bf16(float f) {
  // round to nearest even (inputs are finite here: non-finite rows never reach the GEMM path)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// d floats -> bf16, round to nearest even (NaN rows are never read back: they are scanned in full)
inline void to_bf16_row(const float* in, uint16_t* out, int64_t d) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 32 <= d; i += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + i + 16), _mm512_loadu_ps(in + i));
    _mm512_storeu_si512(reinterpret_cast<void*>(out + i), reinterpret_cast<__m512i>(v));
  }
#endif
  for (; i < d; ++i) out[i] = to_bf16(in[i]);
}

inline float dot(const float* a, const float* b, int64_t d) {
  int64_t i = 0;
  float acc = 0.f;
#if defined(__AVX512F__)
  __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
  for (; i + 32 <= d; i += 32) {
    v0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), v0);
    v1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), v1);
  }
  for (; i + 16 <= d; i += 16) v0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), v0);
  acc = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
#endif
  for (; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

// threshold pass over one row's GEMM dots g_j: returns max_j (a g_j + b_j - nx w_j)
inline float floor_max(const float* g, const float* bias, const float* w, float a, float nx, int64_t k) {
  int64_t j = 0;
  float t = -std::numeric_limits<float>::infinity();
#if defined(__AVX512F__)
  const __m512 av = _mm512_set1_ps(a), nv = _mm512_set1_ps(nx);
  __m512 tv = _mm512_set1_ps(t);
  for (; j + 16 <= k; j += 16) {
    const __m512 qv = _mm512_fmadd_ps(av, _mm512_loadu_ps(g + j), _mm512_loadu_ps(bias + j));
    tv = _mm512_max_ps(tv, _mm512_fnmadd_ps(nv, _mm512_loadu_ps(w + j), qv));
  }
  t = _mm512_reduce_max_ps(tv);
#endif
  for (; j < k; ++j) t = std::max(t, a * g[j] + bias[j] - nx * w[j]);
  return t;
}

struct Problem {
  const float* cb;     // (K, d)
  const float* x;      // searched row i at x + row(i) * x_stride
  int64_t x_stride;
  const int64_t* index;  // row(i) = index[i], or i when null
  int64_t k, d;
  int64_t ldc;         // row stride of the block scores (K rounded up to kTile for brgemm)
  bool l2;
  float a;             // 2 for l2, 1 for cosine
  const float* c_sq;   // (K,) ||c||^2 (l2)
  const float* mu;     // (d,)
  const float* mu_c;   // (K,) mu . c_j
  const float* cs;     // (K, d) fp32 c - mu
  const uint16_t* cb16;  // (K, d) bf16 of c - mu
  const at::BFloat16* packed;  // VNNI tiles of bf16(c - mu)^T for brgemm, or null (MKL GEMM)
  const float* w;      // (K,) a * kappa * ||c'_j||
  const float* bias;   // (K,) b_j
  float eps_coef;      // eps_row = eps_coef * (a ||x'|| cs_max + cs_max^2 + b_max) + eps_abs
  float eps_abs;       // bf16 flush-to-zero of tiny values
  float cs_max, b_max;
  int64_t max_candidates;
};

// Codebook-side arrays of one call (kept per thread between calls: no page faults).
struct CodebookState {
  std::vector<float> mu, mu_c, c_sq, cs, w, bias;
  std::vector<uint16_t> cb16;
  std::vector<at::BFloat16> bt, packed;
};

inline const float* row_ptr(const Problem& p, int64_t i) {
  return p.x + (p.index != nullptr ? p.index[i] : i) * p.x_stride;
}

inline float exact_score(const Problem& p, const float* xr, int64_t j) {
  const float* c = p.cb + j * p.d;
  float s = dot(xr, c, p.d);
  return p.l2 ? 2.f * s - p.c_sq[j] : s;
}

// torch.max(dim) semantics over exact fp32 scores: the first NaN, else the first maximum.
inline void full_scan(const Problem& p, const float* xr, int64_t& code, float& best) {
  code = 0;
  best = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < p.k; ++j) {
    float s = exact_score(p, xr, j);
    if (std::isnan(s)) {
      code = j;
      best = s;
      return;
    }
    if (s > best || j == 0) {
      best = s;
      code = j;
    }
  }
}

// (rows, K) fp32 dot products bf16(x') . bf16(c'_j) for one block of rows (row stride p.ldc)
void gemm_block(const Problem& p, int64_t rows, const uint16_t* xb, float* sb) {
  if (p.packed != nullptr) {
    // oneDNN brgemm (AMX): codes in VNNI-packed tiles of kTile columns
    const auto* a = reinterpret_cast<const at::BFloat16*>(xb);
    for (int64_t n0 = 0; n0 < p.ldc; n0 += kTile) {
      at::native::cpublas::brgemm(rows, kTile, p.d, p.d, kTile, p.ldc, false, a, p.packed + n0 * p.d,
                                  sb + n0, true);
    }
    return;
  }
  cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, static_cast<int>(rows), static_cast<int>(p.k),
                         static_cast<int>(p.d), 1.f, xb, static_cast<int>(p.d), p.cb16,
                         static_cast<int>(p.d), 0.f, sb, static_cast<int>(p.ldc));
}

inline float shifted_score(const Problem& p, const float* xs, int64_t j) {
  return p.a * dot(xs, p.cs + j * p.d, p.d) + p.bias[j];
}

// every code re-scored in fp32 on shifted vectors (rows with too many candidates)
inline int64_t shifted_scan(const Problem& p, const float* xs) {
  int64_t code = 0;
  float best = shifted_score(p, xs, 0);
  for (int64_t j = 1; j < p.k; ++j) {
    const float s = shifted_score(p, xs, j);
    if (s > best) {
      best = s;
      code = j;
    }
  }
  return code;
}

void search_block(const Problem& p, int64_t begin, int64_t end, int64_t* codes, float* scores,
                  std::vector<uint16_t>& xb, std::vector<float>& xs, std::vector<float>& sb,
                  std::vector<float>& xn, std::vector<int64_t>& cand, int64_t& n_cands,
                  int64_t& n_full) {
  const int64_t rows = end - begin;
  const int64_t d = p.d, k = p.k;
  xb.resize(rows * d);
  xs.resize(rows * d);
  sb.resize(rows * p.ldc);
  xn.resize(rows);
  cand.resize(p.max_candidates);
  // shifted rows (fp32 and bf16) and ||x'||; a non-finite value anywhere in a row (or an
  // overflowing norm) gives xn = NaN, and that row is scanned in full below
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = row_ptr(p, begin + r);
    if (begin + r + kPrefetch < end) {
      // rows of a (B, S, d) slot sit a page or more apart: start the next rows' loads early
      const char* next = reinterpret_cast<const char*>(row_ptr(p, begin + r + kPrefetch));
      for (int64_t off = 0; off < d * 4; off += 64) __builtin_prefetch(next + off);
    }
    float* sr = xs.data() + r * d;
    uint16_t* br = xb.data() + r * d;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) {
      const float v = xr[i] - p.mu[i];
      sr[i] = v;
      ss += v * v;
    }
    to_bf16_row(sr, br, d);
    xn[r] = std::isfinite(ss) ? std::sqrt(ss) : std::numeric_limits<float>::quiet_NaN();
  }
  gemm_block(p, rows, xb.data(), sb.data());
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = begin + r;
    const float* xr = row_ptr(p, row);
    const float nx = xn[r];
    if (std::isnan(nx)) {
      full_scan(p, xr, codes[row], scores[row]);
      ++n_full;
      continue;
    }
    const float* sr = xs.data() + r * d;
    const float* g = sb.data() + r * p.ldc;
    const float eps = p.eps_coef * (p.a * nx * p.cs_max + p.cs_max * p.cs_max + p.b_max) + p.eps_abs;
    // q_j = a g_j + b_j (recomputed in each pass: no write-back of the scores)
    const float t = floor_max(g, p.bias, p.w, p.a, nx, k) - 2.f * eps;
    int64_t n = 0;
    bool overflow = false;
    int64_t j0 = 0;
#ifdef __AVX512F__
    // 16 codes per compare; almost every mask is empty
    const __m512 tv = _mm512_set1_ps(t), nv = _mm512_set1_ps(nx), av = _mm512_set1_ps(p.a);
    for (; j0 + 16 <= k && !overflow; j0 += 16) {
      const __m512 qv = _mm512_fmadd_ps(av, _mm512_loadu_ps(g + j0), _mm512_loadu_ps(p.bias + j0));
      const __m512 v = _mm512_fmadd_ps(nv, _mm512_loadu_ps(p.w + j0), qv);
      uint32_t mask = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
      while (mask) {
        if (n == p.max_candidates) {
          overflow = true;
          break;
        }
        cand[n++] = j0 + __builtin_ctz(mask);
        mask &= mask - 1;
      }
    }
#endif
    for (int64_t j = j0; j < k && !overflow; ++j) {
      if (p.a * g[j] + p.bias[j] + nx * p.w[j] >= t) {
        if (n == p.max_candidates) {
          overflow = true;
          break;
        }
        cand[n++] = j;
      }
    }
    int64_t best_j;
    if (overflow || n == 0) {
      best_j = shifted_scan(p, sr);
      ++n_full;
    } else {
      n_cands += n;
      best_j = cand[0];
      float best = shifted_score(p, sr, best_j);
      for (int64_t i = 1; i < n; ++i) {
        const float s = shifted_score(p, sr, cand[i]);
        if (s > best) {  // candidates come in increasing index order: ties keep the lowest
          best = s;
          best_j = cand[i];
        }
      }
    }
    codes[row] = best_j;
    // the winner's unshifted score from the cache-resident shifted row: x = x' + mu, so
    // x . c = x' . c + mu . c (the scattered source row is not read a second time)
    const float xc = dot(sr, p.cb + best_j * d, d) + p.mu_c[best_j];
    scores[row] = p.l2 ? 2.f * xc - p.c_sq[best_j] : xc;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> certified_search(const at::Tensor& x,
                                                                const at::Tensor& codebook,
                                                                const std::optional<at::Tensor>& index,
                                                                bool l2, int64_t block_rows,
                                                                int64_t max_candidates) {
  TORCH_CHECK(x.dim() == 2 && codebook.dim() == 2, "certified_search: x (M, d) and codebook (K, d)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && codebook.scalar_type() == at::kFloat,
              "certified_search: fp32 inputs");
  TORCH_CHECK(x.device().is_cpu() && codebook.device().is_cpu(), "certified_search: CPU tensors");
  TORCH_CHECK(x.size(1) == codebook.size(1), "certified_search: x and codebook widths differ");
  TORCH_CHECK(x.size(0) == 0 || x.stride(1) == 1, "certified_search: x rows must be contiguous");
  TORCH_CHECK(block_rows > 0 && max_candidates > 0, "certified_search: block_rows, max_candidates > 0");
  if (index.has_value()) {
    TORCH_CHECK(index->dim() == 1 && index->scalar_type() == at::kLong && index->is_contiguous() &&
                    index->device().is_cpu(),
                "certified_search: index must be a contiguous 1-d int64 CPU tensor");
    const int64_t* idx = index->data_ptr<int64_t>();
    const int64_t n = x.size(0);
    bool in_range = true;
    for (int64_t i = 0; i < index->numel(); ++i) in_range = in_range && idx[i] >= 0 && idx[i] < n;
    TORCH_CHECK(in_range, "certified_search: index out of range for ", n, " rows");
  }
  const int64_t m = index.has_value() ? index->numel() : x.size(0), d = x.size(1), k = codebook.size(0);
  TORCH_CHECK(k > 0 && d > 0, "certified_search: empty codebook");
  auto codes = at::empty({m}, x.options().dtype(at::kLong));
  auto best = at::empty({m}, x.options());
  auto stats = at::zeros({2}, x.options().dtype(at::kLong));
  if (m == 0) return {codes, best, stats};

  auto cb = codebook.contiguous();
  const float* c = cb.data_ptr<float>();
  const double u = std::ldexp(1.0, -8);
  const double g32 = std::ldexp(1.0, -24);
  const double gamma_d = (d + 2) * g32 / (1.0 - (d + 2) * g32);
  const float a = l2 ? 2.f : 1.f;
  // bf16 rounding of x' and c' (2u + u^2), fp32 accumulation of the GEMM and of the re-score
  // (gamma_d each), fp32 rounding of x - mu and c - mu (2 g32); 1.01 covers the fp32
  // evaluation of the bound itself
  const double kappa = (2 * u + u * u + gamma_d * (1 + u) * (1 + u) + gamma_d + 2 * g32) * 1.01;

  // codebook-side arrays, one pass each over the (K, d) codes (plain loops: at K 256 a dozen
  // ATen ops per call would cost more than the search)
  thread_local CodebookState st;
  st.mu.assign(d, 0.f);
  st.c_sq.resize(k);
  st.mu_c.resize(k);
  st.cs.resize(k * d);
  st.cb16.resize(k * d);
  st.w.resize(k);
  st.bias.resize(k);
  {
    std::vector<double> sum(d, 0.0);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < d; ++i) sum[i] += c[j * d + i];
    for (int64_t i = 0; i < d; ++i) st.mu[i] = static_cast<float>(sum[i] / k);
  }
  bool finite_cb = true;
  float cs_max = 0.f, b_max = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    const float* cj = c + j * d;
    float* sj = st.cs.data() + j * d;
    float csq = 0.f, ssq = 0.f, mdot = 0.f, muc = 0.f;
    for (int64_t i = 0; i < d; ++i) {
      const float v = cj[i] - st.mu[i];
      sj[i] = v;
      csq += cj[i] * cj[i];
      ssq += v * v;
      mdot += st.mu[i] * v;
      muc += st.mu[i] * cj[i];
    }
    st.mu_c[j] = muc;
    to_bf16_row(sj, st.cb16.data() + j * d, d);
    const float norm = std::sqrt(ssq);
    st.c_sq[j] = csq;
    st.w[j] = static_cast<float>(a * kappa) * norm;
    st.bias[j] = l2 ? -ssq : mdot;
    finite_cb = finite_cb && std::isfinite(csq) && std::isfinite(ssq) && std::isfinite(mdot);
    cs_max = std::max(cs_max, norm);
    b_max = std::max(b_max, std::abs(st.bias[j]));
  }
  Problem p;
  p.packed = nullptr;
  p.ldc = k;
  if (finite_cb && d % 2 == 0 && at::native::cpublas::could_pack(at::kBFloat16)) {
    // brgemm wants B = bf16(c')^T (d, K') row-major, packed per kTile columns (zero codes pad K')
    const int64_t kp = (k + kTile - 1) / kTile * kTile;
    st.bt.assign(d * kp, at::BFloat16(0.f));
    for (int64_t j = 0; j < k; ++j)
      for (int64_t i = 0; i < d; ++i) st.bt[i * kp + j] = c10::bit_cast<at::BFloat16>(st.cb16[j * d + i]);
    st.packed.resize(d * kp);
    for (int64_t n0 = 0; n0 < kp; n0 += kTile) {
      at::native::cpublas::pack(d, kTile, kp, kTile, at::kBFloat16, at::kBFloat16, st.bt.data() + n0,
                                st.packed.data() + n0 * d);
    }
    p.packed = st.packed.data();
    p.ldc = kp;
  }
  p.cb = c;
  p.x = x.data_ptr<float>();
  p.x_stride = x.stride(0);
  p.index = index.has_value() ? index->data_ptr<int64_t>() : nullptr;
  p.k = k;
  p.d = d;
  p.l2 = l2;
  p.a = a;
  p.c_sq = st.c_sq.data();
  p.mu = st.mu.data();
  p.mu_c = st.mu_c.data();
  p.cs = st.cs.data();
  p.cb16 = st.cb16.data();
  p.w = st.w.data();
  p.bias = st.bias.data();
  p.cs_max = cs_max;
  p.b_max = b_max;
  // fp32 rounding of b_j and of the bias adds in both scores, 8x for slack
  p.eps_coef = static_cast<float>(8.0 * (gamma_d + g32));
  p.eps_abs = static_cast<float>(4.0 * a * d * 1.2e-38 * (p.cs_max + 1.0));
  p.max_candidates = max_candidates;
  int64_t* codes_p = codes.data_ptr<int64_t>();
  float* best_p = best.data_ptr<float>();
  if (!finite_cb) {
    // torch.max semantics on a codebook with non-finite entries: plain fp32 scan
    at::parallel_for(0, m, 64, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) full_scan(p, row_ptr(p, r), codes_p[r], best_p[r]);
    });
    stats.data_ptr<int64_t>()[1] = m;
    return {codes, best, stats};
  }
  std::atomic<int64_t> total_cands{0}, total_full{0};
  const int64_t n_blocks = (m + block_rows - 1) / block_rows;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<uint16_t> xb;
    thread_local std::vector<float> xs, sb, xn;
    thread_local std::vector<int64_t> cand;
    int64_t n_cands = 0, n_full = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * block_rows;
      const int64_t end = std::min(m, begin + block_rows);
      search_block(p, begin, end, codes_p, best_p, xb, xs, sb, xn, cand, n_cands, n_full);
    }
    if (p.packed != nullptr) at::native::cpublas::brgemm_release(true);
    total_cands += n_cands;
    total_full += n_full;
  });
  stats.data_ptr<int64_t>()[0] = total_cands.load();
  stats.data_ptr<int64_t>()[1] = total_full.load();
  return {codes, best, stats};
}

}  // namespace

TORCH_LIBRARY(vq_torchrec, m) {
  m.def(
      "certified_search(Tensor x, Tensor codebook, Tensor? index, bool l2, int block_rows, "
      "int max_candidates) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vq_torchrec, CPU, m) {
  m.impl("certified_search", certified_search);
}
