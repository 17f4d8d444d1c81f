// normscope's fused CPU reduction: every statistic of one float32 tensor in one pass (plus one
// pass for the sums of squared deviations and one over the histogram's subsample), instead of
// ~20 torch ops per tensor. Built on first use by normscope/collect/native.py (torch's
// cpp_extension, cached per machine); the torch reductions in reducers_fast.py stay the
// reference and the fallback, and the tests compare both with numpy.
//
// Semantics are those of normscope/collect/reducers.py (its docstring is the contract):
// the tensor is viewed as (A, C, S) for its channel axis; per channel the sum s1 and the sum of
// squared deviations m2; mean |x|, zero / non-positive / saturated counts; active[c] = samples
// (rows of A) in which unit c is > 0 at least once; the histogram over flat[::stride]. The packs
// written are the *fast* packs of normscope/collect/packs.py (all-finite tensors). A tensor with
// any NaN or Inf returns an empty tensor: the caller takes the NaN-safe path.
//
// Accuracy: values are accumulated in float32 lanes over blocks of at most kBlock elements per
// lane group, then in float64 (counts are exact: a lane counts at most kBlock / kW < 2**24).

#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int kW = 16;                  // floats per vector (64 bytes; split in two on AVX2)
constexpr int64_t kBlock = 4096;        // elements summed in float32 before a float64 flush
constexpr int64_t kMinChunk = 1 << 17;  // elements per thread before a tensor is split

// GCC/Clang vector extensions: the arithmetic below is written on whole vectors, so it does not
// depend on the auto-vectoriser (which gave up on some of these loops).
typedef float vf __attribute__((vector_size(kW * 4)));
typedef int32_t vi __attribute__((vector_size(kW * 4)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf splat(float f) { return vf{} + f; }
inline vf as_count(vi mask) { return (vf)(mask & (vi)splat(1.0f)); }  // -1/0 lanes -> 1.0f/0.0f
inline vf vabs(vf v) { return (vf)((vi)v & 0x7fffffff); }
inline vf vmin(vf a, vf b) { return b < a ? b : a; }
inline vf vmax(vf a, vf b) { return b > a ? b : a; }
// Horizontal reductions in registers: log2(kW) shuffle steps (through memory they cost ~100
// cycles per run of 16, most of a short run's time).
#if defined(__clang__)
#define NS_SHUF(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define NS_SHUF(v, ...) __builtin_shuffle(v, vi{__VA_ARGS__})
#endif
static_assert(kW == 16, "the shuffle masks below are written for 16 lanes");
#define NS_TREE(v, op)                                                  \
  v = op(v, NS_SHUF(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)); \
  v = op(v, NS_SHUF(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11)); \
  v = op(v, NS_SHUF(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13)); \
  v = op(v, NS_SHUF(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
inline vf vadd(vf a, vf b) { return a + b; }
inline float hsum(vf v) {
  NS_TREE(v, vadd)
  return v[0];
}
inline float hmax(vf v) {
  NS_TREE(v, vmax)
  return v[0];
}
inline float hmin(vf v) {
  NS_TREE(v, vmin)
  return v[0];
}

// The last n < kW elements at p as a vector, the other lanes `fill`.
inline vf load_tail(const float* p, int64_t n, float fill) {
  float t[kW];
  for (int l = 0; l < kW; ++l) t[l] = l < n ? p[l] : fill;
  return load(t);
}
inline vi tail_mask(int64_t n) {
  int32_t t[kW];
  for (int l = 0; l < kW; ++l) t[l] = l < n ? -1 : 0;
  vi m;
  std::memcpy(&m, t, sizeof m);
  return m;
}

struct Scalars {
  double abs_sum = 0, n_zero = 0, n_nonpos = 0, n_sat = 0;
  float mn = std::numeric_limits<float>::infinity();
  float mx = -std::numeric_limits<float>::infinity();
  float probe = 0;  // v - v summed: NaN once any element is NaN or +-Inf
  void merge(const Scalars& o) {
    abs_sum += o.abs_sum;
    n_zero += o.n_zero;
    n_nonpos += o.n_nonpos;
    n_sat += o.n_sat;
    mn = std::min(mn, o.mn);
    mx = std::max(mx, o.mx);
    probe += o.probe;
  }
};

// saturation kinds: 0 none, 1 open interval (sigmoid y < lo or y > hi; tanh the same,
// symmetric), 3 bounds (y <= lo or y >= hi)
template <int SAT, bool STD>
struct Lanes {
  vf abs_{}, zero{}, nonpos{}, sat{}, probe{};
  vf mn = splat(std::numeric_limits<float>::infinity());
  vf mx = splat(-std::numeric_limits<float>::infinity());
  vf slo, shi;
  int64_t since = 0;  // elements since the last flush
  Lanes(float lo, float hi) : slo(splat(lo)), shi(splat(hi)) {}

  // one full vector of elements; `valid` masks the lanes that hold elements (tails)
  inline void add(vf v, vi valid, int64_t n) {
    mn = vmin(mn, valid ? v : mn);
    mx = vmax(mx, valid ? v : mx);
    probe += valid ? v - v : vf{};
    if constexpr (STD) {
      abs_ += valid ? vabs(v) : vf{};
      zero += as_count((v == 0.0f) & valid);
      nonpos += as_count((v <= 0.0f) & valid);
      if constexpr (SAT == 1) sat += as_count(((v < slo) | (v > shi)) & valid);
      if constexpr (SAT == 3) sat += as_count(((v <= slo) | (v >= shi)) & valid);
    }
    since += n;
  }
  inline void add(vf v) {
    mn = vmin(mn, v);
    mx = vmax(mx, v);
    probe += v - v;
    if constexpr (STD) {
      abs_ += vabs(v);
      zero += as_count(v == 0.0f);
      nonpos += as_count(v <= 0.0f);
      if constexpr (SAT == 1) sat += as_count((v < slo) | (v > shi));
      if constexpr (SAT == 3) sat += as_count((v <= slo) | (v >= shi));
    }
    since += kW;
  }
  inline void maybe_flush(Scalars& s) {
    if (since >= kBlock * kW / 16) flush(s);
  }
  void flush(Scalars& s) {
    s.mn = std::min(s.mn, hmin(mn));
    s.mx = std::max(s.mx, hmax(mx));
    s.probe += hsum(probe);
    if constexpr (STD) {
      s.abs_sum += hsum(abs_);
      s.n_zero += hsum(zero);
      s.n_nonpos += hsum(nonpos);
      s.n_sat += hsum(sat);
    }
    abs_ = zero = nonpos = sat = probe = vf{};
    mn = splat(std::numeric_limits<float>::infinity());
    mx = splat(-std::numeric_limits<float>::infinity());
    since = 0;
  }
};

// The scalar statistics of n contiguous elements.
template <int SAT, bool STD>
inline void scan(Lanes<SAT, STD>& L, const float* p, int64_t n, Scalars& sc) {
  int64_t k = 0;
  for (; k + kW <= n; k += kW) L.add(load(p + k));
  if (k < n) L.add(load_tail(p + k, n - k, 0.0f), tail_mask(n - k), n - k);
  L.maybe_flush(sc);
}

// Runs mode, over rows [a0, a1) of a channel-first (A, C, S) tensor with long runs: per channel the sum
// and the samples with a positive element; the scalar statistics. s1 and active have C entries.
template <int SAT, bool STD>
void pass1_runs(const float* x, int64_t a0, int64_t a1, int64_t C, int64_t S, float slo, float shi,
                double* s1, double* active, Scalars& sc) {
  Lanes<SAT, STD> L(slo, shi);
  const vf ninf = splat(-std::numeric_limits<float>::infinity());
  for (int64_t a = a0; a < a1; ++a) {
    for (int64_t c = 0; c < C; ++c) {
      const float* p = x + (a * C + c) * S;
      double run_sum = 0;
      float run_top = -std::numeric_limits<float>::infinity();
      for (int64_t b0 = 0; b0 < S; b0 += kBlock) {
        const int64_t b1 = std::min(S, b0 + kBlock);
        vf sum{}, top = ninf;
        int64_t k = b0;
        for (; k + kW <= b1; k += kW) {
          const vf v = load(p + k);
          sum += v;
          if constexpr (STD) top = vmax(top, v);
          L.add(v);
        }
        if (k < b1) {
          const vi m = tail_mask(b1 - k);
          const vf v = load_tail(p + k, b1 - k, 0.0f);
          sum += v;
          if constexpr (STD) top = vmax(top, m ? v : ninf);
          L.add(v, m, b1 - k);
        }
        run_sum += hsum(sum);
        if constexpr (STD) run_top = std::max(run_top, hmax(top));
        L.maybe_flush(sc);
      }
      s1[c] += run_sum;
      if constexpr (STD) active[c] += static_cast<double>(run_top > 0.0f);  // branch-free: often 50/50
    }
  }
  L.flush(sc);
}

// Per channel of one row (C runs of S), whether any element is > 0, added to cp[c]. Runs that are
// whole vectors reduce in registers; runs of 2, 4 or 8 are reduced inside a vector (a shuffle
// tree per segment); other lengths element by element.
inline void row_active(const float* p, int64_t C, int64_t S, float* cp) {
  const int64_t R = C * S;
  if (S % kW == 0) {
    for (int64_t c = 0; c < C; ++c) {
      const float* q = p + c * S;
      vf m = load(q);
      for (int64_t k = kW; k < S; k += kW) m = vmax(m, load(q + k));
      cp[c] += static_cast<float>(hmax(m) > 0.0f);
    }
    return;
  }
  int64_t j = 0;
  if (S == 2 || S == 4 || S == 8) {
    for (; j + kW <= R; j += kW) {
      vf v = load(p + j);
      v = vmax(v, NS_SHUF(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
      if (S >= 4) v = vmax(v, NS_SHUF(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
      if (S >= 8) v = vmax(v, NS_SHUF(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
      float t[kW];
      std::memcpy(t, &v, sizeof t);
      for (int64_t g = 0; g < kW; g += S) cp[(j + g) / S] += static_cast<float>(t[g] > 0.0f);
    }
  }
  for (int64_t c = j / S; c < C; ++c) {  // the rest (every channel for other run lengths)
    const float* q = p + c * S;
    float m = q[0];
    for (int64_t k = 1; k < S; ++k) m = std::max(m, q[k]);
    cp[c] += static_cast<float>(m > 0.0f);
  }
}

// Rows mode: an (A, C, S) tensor whose row (C * S elements) fits a small buffer, row by row:
// column sums (and, for S == 1, column positives) in float32 vectors, folded into channels and
// flushed to float64 every few rows, so no run needs a horizontal sum; the scalar statistics in
// the same pass.
constexpr int64_t kRowsMaxRun = 64;  // runs at least this long go run by run (measured: faster from 64)
constexpr int64_t kRowsMaxRow = 1 << 16;  // rows longer than this go run by run

inline bool rows_mode(int64_t C, int64_t S) { return S == 1 || (S < kRowsMaxRun && C * S <= kRowsMaxRow); }

template <int SAT, bool STD>
void pass1_rows(const float* x, int64_t a0, int64_t a1, int64_t C, int64_t S, float slo, float shi, double* s1,
                double* active, Scalars& sc) {
  const int64_t R = C * S;
  const int64_t kRows = 256;  // float32 column sums of at most 256 rows, then float64
  std::vector<float> csum(R, 0.0f), cpos(S == 1 ? R : C, 0.0f);  // S > 1: samples with a positive, per channel
  float* cs = csum.data();
  float* cp = cpos.data();
  Lanes<SAT, STD> L(slo, shi);
  int64_t rows = 0;
  for (int64_t a = a0; a < a1; ++a) {
    const float* p = x + a * R;
    int64_t j = 0;
    for (; j + kW <= R; j += kW) {
      const vf v = load(p + j);
      const vf t = load(cs + j) + v;
      std::memcpy(cs + j, &t, sizeof t);
      if constexpr (STD) {
        if (S == 1) {
          const vf q = load(cp + j) + as_count(v > 0.0f);
          std::memcpy(cp + j, &q, sizeof q);
        }
      }
      L.add(v);
    }
    if (j < R) {
      const int64_t n = R - j;
      L.add(load_tail(p + j, n, 0.0f), tail_mask(n), n);
      for (; j < R; ++j) {
        cs[j] += p[j];
        if constexpr (STD) {
          if (S == 1) cp[j] += p[j] > 0.0f ? 1.0f : 0.0f;
        }
      }
    }
    L.maybe_flush(sc);
    if constexpr (STD) {
      if (S > 1) row_active(p, C, S, cp);
    }
    if (++rows == kRows || a + 1 == a1) {
      for (int64_t c = 0; c < C; ++c) {
        double t = 0;
        for (int64_t k = 0; k < S; ++k) t += cs[c * S + k];
        s1[c] += t;
        if constexpr (STD) active[c] += cp[c];
      }
      std::fill(csum.begin(), csum.end(), 0.0f);
      std::fill(cpos.begin(), cpos.end(), 0.0f);
      rows = 0;
    }
  }
  L.flush(sc);
}

// Pass 2: per-channel sums of squared deviations from the channel means (float32 means).
void pass2(const float* x, int64_t a0, int64_t a1, int64_t C, int64_t S, const float* mean, double* m2) {
  if (rows_mode(C, S)) {
    const int64_t R = C * S;
    const int64_t kRows = 256;
    std::vector<float> mu(R), acc(R, 0.0f);
    for (int64_t j = 0; j < R; ++j) mu[j] = mean[j / S];
    float* ac = acc.data();
    const float* mp = mu.data();
    int64_t rows = 0;
    for (int64_t a = a0; a < a1; ++a) {
      const float* p = x + a * R;
      int64_t j = 0;
      for (; j + kW <= R; j += kW) {
        const vf d = load(p + j) - load(mp + j);
        vf t = load(ac + j) + d * d;
        std::memcpy(ac + j, &t, sizeof t);
      }
      for (; j < R; ++j) {
        const float d = p[j] - mp[j];
        ac[j] += d * d;
      }
      if (++rows == kRows || a + 1 == a1) {
        for (int64_t c = 0; c < C; ++c) {
          double t = 0;
          for (int64_t s = 0; s < S; ++s) t += ac[c * S + s];
          m2[c] += t;
        }
        std::fill(acc.begin(), acc.end(), 0.0f);
        rows = 0;
      }
    }
    return;
  }
  for (int64_t a = a0; a < a1; ++a) {
    for (int64_t c = 0; c < C; ++c) {
      const float* p = x + (a * C + c) * S;
      const vf mu = splat(mean[c]);
      double run = 0;
      for (int64_t b0 = 0; b0 < S; b0 += kBlock) {
        const int64_t b1 = std::min(S, b0 + kBlock);
        vf acc{};
        int64_t k = b0;
        for (; k + kW <= b1; k += kW) {
          const vf d = load(p + k) - mu;
          acc += d * d;
        }
        if (k < b1) {
          const vf d = load_tail(p + k, b1 - k, mean[c]) - mu;  // padding lanes: d = 0
          acc += d * d;
        }
        run += hsum(acc);
      }
      m2[c] += run;
    }
  }
}

// Row ranges, one per thread, of at least kMinChunk elements each.
std::vector<int64_t> row_chunks(int64_t A, int64_t row_len) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_size = std::max<int64_t>(1, (A * row_len) / kMinChunk);
  const int64_t n = std::max<int64_t>(1, std::min({threads, by_size, A}));
  std::vector<int64_t> edges(n + 1);
  for (int64_t i = 0; i <= n; ++i) edges[i] = A * i / n;
  return edges;
}

template <typename F>
void for_chunks(const std::vector<int64_t>& edges, F&& f) {
  const int64_t n = static_cast<int64_t>(edges.size()) - 1;
  if (n == 1) {
    f(0, edges[0], edges[1]);
    return;
  }
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) f(i, edges[i], edges[i + 1]);
  });
}

template <int SAT, bool STD>
bool pass1(const float* x, int64_t A, int64_t C, int64_t S, float slo, float shi, double* s1, double* active,
           Scalars& sc) {
  const auto edges = row_chunks(A, C * S);
  const int64_t n = static_cast<int64_t>(edges.size()) - 1;
  std::vector<double> ps1(n * C, 0.0), pact(n * C, 0.0);
  std::vector<Scalars> psc(n);
  for_chunks(edges, [&](int64_t i, int64_t a0, int64_t a1) {
    if (rows_mode(C, S)) {
      pass1_rows<SAT, STD>(x, a0, a1, C, S, slo, shi, ps1.data() + i * C, pact.data() + i * C, psc[i]);
    } else {
      pass1_runs<SAT, STD>(x, a0, a1, C, S, slo, shi, ps1.data() + i * C, pact.data() + i * C, psc[i]);
    }
  });
  for (int64_t i = 0; i < n; ++i) {
    sc.merge(psc[i]);
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += ps1[i * C + c];
      active[c] += pact[i * C + c];
    }
  }
  return std::isfinite(sc.probe) && std::isfinite(sc.mn) && std::isfinite(sc.mx);
}

template <bool STD>
bool pass1_dispatch(int64_t sat_kind, const float* x, int64_t A, int64_t C, int64_t S, float slo, float shi,
                    double* s1, double* active, Scalars& sc) {
  switch (sat_kind) {
    case 1:
    case 2:
      return pass1<1, STD>(x, A, C, S, slo, shi, s1, active, sc);
    case 3:
      return pass1<3, STD>(x, A, C, S, slo, shi, s1, active, sc);
    default:
      return pass1<0, STD>(x, A, C, S, slo, shi, s1, active, sc);
  }
}

// hist_kind: 1 symlog (bins from the float's sign and exponent bits), 2 linear over [lo, hi).
// Four interleaved sub-histograms: consecutive elements mostly fall in the same few bins, and one
// counter incremented back to back waits on its own store every time.
void histogram(const float* x, int64_t numel, int64_t stride, int64_t kind, int64_t bins, double lo,
               double hi, int64_t symlog_lo_exp, int64_t symlog_k, double* out) {
  constexpr int kSub = 4;
  std::vector<int32_t> h(kSub * bins, 0);  // each sub-histogram counts < 2**31 elements
  const int64_t n = numel <= 0 ? 0 : (numel - 1) / stride + 1;
  std::vector<int64_t> big(n >= (int64_t(1) << 31) ? bins : 0, 0);
  auto bin_of = [&](int64_t i) -> int32_t {
    if (kind == 1) {
      const int32_t shift = 127 + static_cast<int32_t>(symlog_lo_exp) - 1;
      const int32_t kmax = static_cast<int32_t>(symlog_k) + 1;
      int32_t bits;
      std::memcpy(&bits, x + i, sizeof bits);
      int32_t k = ((bits >> 23) & 0xFF) - shift;
      k = std::min(std::max(k, 0), kmax);
      const int32_t neg = bits >> 31;  // -1 for a set sign bit: (k ^ neg) - neg == -k
      return ((k ^ neg) - neg) + kmax;
    }
    // the float32 arithmetic of reducers_fast._hist_fast: (y - lo) * (bins / (hi - lo)), truncated
    const float flo = static_cast<float>(lo);
    const float scale = static_cast<float>(static_cast<double>(bins) / (hi - lo));
    float t = (x[i] - flo) * scale;
    t = std::min(std::max(t, 0.0f), static_cast<float>(bins - 1));
    return static_cast<int32_t>(t);
  };
  int64_t j = 0;
  for (; j + kSub <= n; j += kSub) {
    for (int u = 0; u < kSub; ++u) h[u * bins + bin_of((j + u) * stride)]++;
    if (!big.empty() && (j & ((int64_t(1) << 28) - 1)) == 0) {  // past 2**31 elements: drain into int64
      for (int64_t b = 0; b < kSub * bins; ++b) big[b % bins] += h[b], h[b] = 0;
    }
  }
  for (; j < n; ++j) h[bin_of(j * stride)]++;
  for (int64_t b = 0; b < bins; ++b) {
    int64_t t = big.empty() ? 0 : big[b];
    for (int u = 0; u < kSub; ++u) t += h[u * bins + b];
    out[b] = static_cast<double>(t);
  }
}

}  // namespace

// The fast pack of one all-finite float32 CPU tensor viewed as (A, C, S), or an empty tensor when
// it holds NaN or Inf. standard: the "standard"/"full" fields (else "minimal": min, max, s1, m2).
// Layout (packs.ACT_FIELDS, fast fields, scalars first): min, max, [abs_sum, n_zero, n_nonpos,
// n_sat], s1[C], m2[C], [active[C], hist[bins]].
torch::Tensor act_pack(const torch::Tensor& x, int64_t A, int64_t C, int64_t S, bool standard, int64_t hist_kind,
                       int64_t bins, double hist_lo, double hist_hi, int64_t stride, int64_t sat_kind, double sat_lo,
                       double sat_hi, int64_t symlog_lo_exp, int64_t symlog_k) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "act_pack: a contiguous float32 CPU tensor");
  TORCH_CHECK(A * C * S == x.numel() && C > 0, "act_pack: (A, C, S) does not match the tensor");
  // the symlog bin index comes from the exponent bits: any other bin count would write past the
  // histogram (linear bins are clamped to the count)
  TORCH_CHECK(!standard || bins == 0 || hist_kind == 2 || (hist_kind == 1 && bins == 2 * (symlog_k + 1) + 1),
              "act_pack: a symlog histogram has 2 * (symlog_k + 1) + 1 bins");
  TORCH_CHECK(bins >= 0 && stride >= 0, "act_pack: negative bins or stride");
  if (!x.has_storage()) return torch::empty({0}, torch::dtype(torch::kFloat64));  // the caller's NaN-safe path
  const float* p = x.data_ptr<float>();
  const int64_t head = standard ? 6 : 2;
  const int64_t size = head + 2 * C + (standard ? C + bins : 0);
  auto out = torch::zeros({size}, torch::dtype(torch::kFloat64));
  double* o = out.data_ptr<double>();
  double* s1 = o + head;
  double* m2 = s1 + C;
  double* active = standard ? m2 + C : nullptr;
  std::vector<double> scratch_active(standard ? 0 : C, 0.0);
  Scalars sc;
  const float slo = static_cast<float>(sat_lo), shi = static_cast<float>(sat_hi);
  const bool finite = standard ? pass1_dispatch<true>(sat_kind, p, A, C, S, slo, shi, s1, active, sc)
                               : pass1_dispatch<false>(0, p, A, C, S, slo, shi, s1, scratch_active.data(), sc);
  if (!finite) return torch::empty({0}, torch::dtype(torch::kFloat64));
  const double per = static_cast<double>(A * S);
  std::vector<float> mean(C);
  for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<float>(s1[c] / per);
  {
    const auto edges = row_chunks(A, C * S);
    const int64_t n = static_cast<int64_t>(edges.size()) - 1;
    std::vector<double> pm2(n * C, 0.0);
    for_chunks(edges, [&](int64_t i, int64_t a0, int64_t a1) { pass2(p, a0, a1, C, S, mean.data(), pm2.data() + i * C); });
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < C; ++c) m2[c] += pm2[i * C + c];
  }
  o[0] = sc.mn;
  o[1] = sc.mx;
  if (standard) {
    o[2] = sc.abs_sum;
    o[3] = sc.n_zero;
    o[4] = sc.n_nonpos;
    o[5] = sat_kind == 0 ? 0.0 : sc.n_sat;
    if (bins > 0)
      histogram(p, x.numel(), std::max<int64_t>(stride, 1), hist_kind, bins, hist_lo, hist_hi, symlog_lo_exp, symlog_k,
                active + C);
  }
  return out;
}

// The fast gradient pack (packs.GRAD_FIELDS, fast fields): sum of squares, max |g|; empty when
// the tensor holds NaN or Inf.
torch::Tensor grad_pack(const torch::Tensor& g) {
  TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == at::kFloat && g.is_contiguous(),
              "grad_pack: a contiguous float32 CPU tensor");
  if (!g.has_storage()) return torch::empty({0}, torch::dtype(torch::kFloat64));  // the caller's NaN-safe path
  const float* p = g.data_ptr<float>();
  const int64_t n = g.numel();
  const auto edges = row_chunks(std::max<int64_t>(1, (n + kBlock - 1) / kBlock), kBlock);
  const int64_t parts = static_cast<int64_t>(edges.size()) - 1;
  std::vector<double> sq(parts, 0.0);
  std::vector<float> amax(parts, 0.0f), probe(parts, 0.0f);
  for_chunks(edges, [&](int64_t i, int64_t b0, int64_t b1) {
    const int64_t e0 = std::min(n, b0 * kBlock), e1 = std::min(n, b1 * kBlock);
    double total = 0;
    float mx[kW] = {0}, pr[kW] = {0};
    for (int64_t s = e0; s < e1; s += kBlock) {
      const int64_t t = std::min(e1, s + kBlock);
      float acc[kW] = {0};
      int64_t k = s;
      for (; k + kW <= t; k += kW) {
        for (int l = 0; l < kW; ++l) {
          const float v = p[k + l];
          acc[l] += v * v;
          mx[l] = std::max(mx[l], std::fabs(v));
          pr[l] += v - v;
        }
      }
      for (; k < t; ++k) {
        const float v = p[k];
        acc[0] += v * v;
        mx[0] = std::max(mx[0], std::fabs(v));
        pr[0] += v - v;
      }
      double b = 0;
      for (int l = 0; l < kW; ++l) b += acc[l];
      total += b;
    }
    float m = 0, q = 0;
    for (int l = 0; l < kW; ++l) {
      m = std::max(m, mx[l]);
      q += pr[l];
    }
    sq[i] = total;
    amax[i] = m;
    probe[i] = q;
  });
  double total = 0, m = 0, q = 0;
  for (int64_t i = 0; i < parts; ++i) {
    total += sq[i];
    m = std::max(m, static_cast<double>(amax[i]));
    q += probe[i];
  }
  if (!std::isfinite(q) || !std::isfinite(m)) return torch::empty({0}, torch::dtype(torch::kFloat64));
  auto out = torch::empty({2}, torch::dtype(torch::kFloat64));
  out.data_ptr<double>()[0] = total;
  out.data_ptr<double>()[1] = m;
  return out;
}

namespace {

// N sums of squares over the same n elements in one pass, the one loop behind the parameter,
// gradient and update norms: lanes(k, v) fills v[0..N) with elements k .. k + kW - 1 of each
// stream, one(k, f) single elements (the tail); float32 vectors flushed to float64 per block,
// split across threads for long tensors. Streams read together keep more of the memory bus busy
// than one pass per stream (measured: 17 % less time for two streams of 20 MB on one core).
template <int N, typename Lanes, typename One>
std::array<double, N> sumsq_n(int64_t n, Lanes lanes, One one) {
  const auto edges = row_chunks(std::max<int64_t>(1, (n + kBlock - 1) / kBlock), kBlock);
  const int64_t parts = static_cast<int64_t>(edges.size()) - 1;
  std::vector<std::array<double, N>> part(parts);
  for_chunks(edges, [&](int64_t i, int64_t b0, int64_t b1) {
    const int64_t e0 = std::min(n, b0 * kBlock), e1 = std::min(n, b1 * kBlock);
    std::array<double, N> total{};
    for (int64_t s = e0; s < e1; s += kBlock) {
      const int64_t t = std::min(e1, s + kBlock);
      vf acc[N] = {};
      vf v[N];
      int64_t k = s;
      for (; k + kW <= t; k += kW) {
        lanes(k, v);
        for (int j = 0; j < N; ++j) acc[j] += v[j] * v[j];
      }
      float tail[N] = {}, f[N];
      for (; k < t; ++k) {
        one(k, f);
        for (int j = 0; j < N; ++j) tail[j] += f[j] * f[j];
      }
      for (int j = 0; j < N; ++j) total[j] += static_cast<double>(hsum(acc[j])) + tail[j];
    }
    part[i] = total;
  });
  std::array<double, N> total{};
  for (const auto& p : part)
    for (int j = 0; j < N; ++j) total[j] += p[j];
  return total;
}

// Σ p² over n floats.
double sumsq(const float* p, int64_t n) {
  return sumsq_n<1>(n, [&](int64_t k, vf* v) { v[0] = load(p + k); }, [&](int64_t k, float* f) { f[0] = p[k]; })[0];
}

// One parameter's update read back from its optimizer's state (normscope/collect/updates.py has
// the algebra): A = a·t1 + b·t2 (KIND 0: SGD) or a·(t1 / (√t2 / k + eps)) (KIND 1: Adam, in the
// order torch's Adam computes it); Δ = (A − c·w) · d, d = 1 / (1 − c). KIND 2: Δ = t1 − w (t1: a
// copy of the weights before the step).
struct Update {
  const float *w, *t1, *t2;
  float a, b, k, eps, c, d;
  template <int KIND>
  float at(int64_t i) const {
    if constexpr (KIND == 2) return t1[i] - w[i];
    const float A = KIND == 0 ? a * t1[i] + b * t2[i] : a * (t1[i] / (std::sqrt(t2[i]) / k + eps));
    return (A - c * w[i]) * d;
  }
  template <int KIND>
  vf lanes(int64_t k0) const {
    if constexpr (KIND == 2) return load(t1 + k0) - load(w + k0);
    float l[kW];
    for (int j = 0; j < kW; ++j) l[j] = at<KIND>(k0 + j);  // vectorised (-fno-math-errno: sqrtps)
    return load(l);
  }
  // Σ w², Σ g² (G: g given) and Σ Δ² (KIND >= 0) in one pass over the streams involved.
  template <bool G, int KIND>
  std::array<double, 3> step_sumsq(const float* g, int64_t n) const {
    constexpr int N = 1 + (G ? 1 : 0) + (KIND >= 0 ? 1 : 0);
    const auto r = sumsq_n<N>(
        n,
        [&](int64_t k0, vf* v) {
          v[0] = load(w + k0);
          if constexpr (G) v[1] = load(g + k0);
          if constexpr (KIND >= 0) v[N - 1] = lanes<KIND>(k0);
        },
        [&](int64_t i, float* f) {
          f[0] = w[i];
          if constexpr (G) f[1] = g[i];
          if constexpr (KIND >= 0) f[N - 1] = at<KIND>(i);
        });
    return {r[0], G ? r[1] : 0.0, KIND >= 0 ? r[N - 1] : 0.0};
  }
};

template <bool G>
std::array<double, 3> step_sumsq_kind(const Update& u, const float* g, int64_t kind, int64_t n) {
  switch (kind) {
    case 0:
      return u.step_sumsq<G, 0>(g, n);
    case 1:
      return u.step_sumsq<G, 1>(g, n);
    case 2:
      return u.step_sumsq<G, 2>(g, n);
    default:
      return u.step_sumsq<G, -1>(g, n);
  }
}

bool plain(const torch::Tensor& t) {  // wrapper tensors (torch.func, fake, functional) have no storage
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
         t.has_storage() && !t.is_meta();
}

}  // namespace

// Squared norms (float64) of float32 contiguous CPU tensors, one call for a whole parameter list;
// an empty tensor when any is of another kind (the caller takes torch's foreach ops).
torch::Tensor sq_norms(const std::vector<torch::Tensor>& ts) {
  for (const auto& t : ts)
    if (!plain(t)) return torch::empty({0}, torch::dtype(torch::kFloat64));
  auto out = torch::empty({static_cast<int64_t>(ts.size())}, torch::dtype(torch::kFloat64));
  double* o = out.data_ptr<double>();
  for (size_t i = 0; i < ts.size(); ++i) o[i] = sumsq(ts[i].data_ptr<float>(), ts[i].numel());
  return out;
}

// The norms after an optimizer step, each parameter's tensors read in one pass: a 3 x P float64
// tensor of ‖w‖², ‖g‖² (0 where g is not given: an empty list for all) and ‖Δ‖². The kind of Δ
// (updates.py has the algebra): 0 SGD, 1 Adam (both as Update above), 2 Δ = t1 − w (t1: the
// weights' copy before the step), 3 Δ = a·g (its norm from ‖g‖²: this pass's, else gsq[i], the
// norms taken before the step), -1 Δ = 0, -2 unknown (NaN). coef: 7 numbers per parameter,
// (kind, a, b, k, eps, c, d); t1 / t2 repeat w where unused. An empty tensor when any tensor is
// of another kind or the sizes differ.
torch::Tensor step_sq_norms(const std::vector<torch::Tensor>& w, const std::vector<torch::Tensor>& g,
                            const std::vector<torch::Tensor>& t1, const std::vector<torch::Tensor>& t2,
                            const std::vector<double>& coef, const torch::Tensor& gsq) {
  const auto none = torch::empty({0}, torch::dtype(torch::kFloat64));
  const int64_t P = static_cast<int64_t>(w.size());
  const bool with_g = !g.empty();
  if ((with_g && static_cast<int64_t>(g.size()) != P) || static_cast<int64_t>(t1.size()) != P ||
      static_cast<int64_t>(t2.size()) != P || static_cast<int64_t>(coef.size()) != 7 * P)
    return none;
  const bool with_gsq = gsq.defined() && gsq.numel() == P && gsq.device().is_cpu() &&
                        gsq.scalar_type() == at::kDouble && gsq.is_contiguous();
  for (int64_t i = 0; i < P; ++i)
    if (coef[7 * i] == 3 && !with_g && !with_gsq) return none;
  for (int64_t i = 0; i < P; ++i) {
    const int64_t n = w[i].numel();
    if (!plain(w[i]) || !plain(t1[i]) || !plain(t2[i]) || t1[i].numel() != n || t2[i].numel() != n ||
        (with_g && (!plain(g[i]) || g[i].numel() != n)))
      return none;
  }
  const double* cf = coef.data();
  auto out = torch::empty({3, P}, torch::dtype(torch::kFloat64));
  double* o = out.data_ptr<double>();
  for (int64_t i = 0; i < P; ++i) {
    const double* r = cf + 7 * i;
    const Update u{w[i].data_ptr<float>(), t1[i].data_ptr<float>(), t2[i].data_ptr<float>(),
                   static_cast<float>(r[1]), static_cast<float>(r[2]), static_cast<float>(r[3]),
                   static_cast<float>(r[4]), static_cast<float>(r[5]), static_cast<float>(r[6])};
    const int64_t n = w[i].numel(), kind = static_cast<int64_t>(r[0]);
    const auto s = with_g ? step_sumsq_kind<true>(u, g[i].data_ptr<float>(), kind, n)
                          : step_sumsq_kind<false>(u, nullptr, kind, n);
    o[i] = s[0];
    o[P + i] = s[1];
    o[2 * P + i] = kind == 3    ? r[1] * r[1] * (with_g ? s[1] : gsq.data_ptr<double>()[i])
                   : kind == -2 ? std::numeric_limits<double>::quiet_NaN()
                                : s[2];
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step_sq_norms", &step_sq_norms, "weight, gradient and update norms after a step, one pass (empty: some other kind)");
  m.def("sq_norms", &sq_norms, "squared norms of float32 CPU tensors (empty: some other kind)");
  m.def("act_pack", &act_pack, "the fast activation pack of a float32 CPU tensor (empty: not all finite)");
  m.def("grad_pack", &grad_pack, "the fast gradient pack of a float32 CPU tensor (empty: not all finite)");
}
