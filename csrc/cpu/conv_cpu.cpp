// The op layer's stages (ik_fast/ops.py) on CPU tensors: conv, conv_backward and trunk_moments of implementation
// "native", registered for the CPU dispatch key.
//
// Algorithm (docs/design.md). Receivers (the CSR rows) are cut into work items of about 4 tiles of edges;
// threads claim items dynamically (one parallel region per stage, no barrier per item), so a thread that loses its
// core to another process delays only the item it holds. Per item, edges go through the trunk in tiles of t edges
// (t chosen so a tile's Fourier-sampled activation, G*C*t numbers, stays within L2), feature-major (H x t):
//   trunk      every Linear one GEMM (componentwise: the small kernel below per component, too small for a BLAS
//              call), every Fourier ELU two GEMMs through the G grid points with the ELU in between (vectorised
//              expm1), every batch norm's affine map as the tile's activation is written (the next Linear reads
//              the affine's output, the backward also the activation before it), all on the tile; the batch
//              statistics of a tile in interleaved double sums;
//   contract   Z_i = sum_e s_e h_e (x) x_src(e), only on the blocks of the last Linear's plan (plan_for): per pair
//              a (nh x nc) block per receiver, accumulated by a small outer-product loop;
//   weight     out_i = W' vec(Z_i) + B' z_i as one GEMM per pair over the item's receivers (W' gathered into the
//              plan's dense blocks once per call).
// A gated or norm layer (program.h, Irreps) keeps its Linear's output on the tile where a Fourier ELU keeps its grid,
// and applies its activation irrep by irrep on the component-major rows (ELU, or a scale by a sigmoid per channel
// and edge); a Fourier ELU or pointwise ELU layer does exactly what it did before.
// The backward reads the trunk's tiles from the tape when the host passes one (ik_fast/ops.py: the statistics passes'
// activations before their batch norms, which it applies again, and their Fourier grids on small graphs; a grid not in
// the tape is re-evaluated from the layer's input, half the layer's forward work) and otherwise recomputes the trunk
// per tile; it forms dZ_i = W'^T dout_i per pair, and goes back through the contraction and the trunk; weight, bias
// and batch-norm gradients accumulate in fixed slots summed in order; dx accumulates per slot over source nodes.
// Nothing of size E x R x C_in or E x H x C_in exists, nor E x G x C beyond the grids of a tape: per thread, memory is
// a few tiles' buffers plus one item's Z.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <type_traits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <cmath>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../ik_fast.h"
#include "blas.h"
#include "program.h"

namespace ik_fast {
namespace cpu {

namespace {

using at::Tensor;
using at::TensorList;

// ----------------------------------------------------------------------------------------------------------------
// elementwise
// ----------------------------------------------------------------------------------------------------------------
#if defined(__AVX2__) && defined(__FMA__)
// ELU of 8 floats: u where u > 0 (or NaN), else expm1(u) = 2^n expm1(r) + (2^n - 1) with u = n ln2 + r,
// |r| <= ln2 / 2, and expm1(r) by its Taylor polynomial to r^7 (relative error < 2e-8, below float32's 6e-8);
// accurate near 0, where exp(u) - 1 would cancel. Sleef's expm1 (ATen's) costs several times more.
inline __m256 elu8(__m256 u) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 v = _mm256_min_ps(_mm256_max_ps(u, _mm256_set1_ps(-87.0f)), zero);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), v);  // ln2 in two parts (Cody-Waite)
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 two_n = _mm256_castsi256_ps(e);
  const __m256 res = _mm256_fmadd_ps(two_n, p, _mm256_sub_ps(two_n, _mm256_set1_ps(1.0f)));
  return _mm256_blendv_ps(res, u, _mm256_cmp_ps(u, zero, _CMP_NLE_UQ));
}
#endif

template <typename T>
void elu_inplace(T* p, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, elu8(_mm256_loadu_ps(p + i)));
  }
#endif
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0));
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec u = Vec::loadu(p + i);
    Vec::blendv(u.expm1(), u, u > zero).store(p + i);
  }
  for (; i < n; ++i) p[i] = p[i] > T(0) ? p[i] : std::expm1(p[i]);
}

// g *= ELU'(u), from the ELU's output v (v > 0 iff u > 0; ELU'(u) = v + 1 for u <= 0)
template <typename T>
void elu_grad_inplace(T* g, const T* v, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  int64_t i = 0;
  const Vec zero(T(0)), one(T(1));
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec vv = Vec::loadu(v + i);
    Vec d = Vec::blendv(vv + one, one, vv > zero);
    (Vec::loadu(g + i) * d).store(g + i);
  }
  for (; i < n; ++i) g[i] *= v[i] > T(0) ? T(1) : v[i] + T(1);
}

// s = sigmoid(x - b) on n entries (the gates' and the norms' factors; s may be x)
template <typename T>
void sigmoid_into(const T* x, T b, int64_t n, T* s) {
  using Vec = at::vec::Vectorized<T>;
  const Vec one(T(1)), bv(b);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (one / (one + (bv - Vec::loadu(x + i)).exp())).store(s + i);
  for (; i < n; ++i) s[i] = T(1) / (T(1) + std::exp(b - x[i]));
}

// ----------------------------------------------------------------------------------------------------------------
// reductions along a row
// ----------------------------------------------------------------------------------------------------------------
// sum of term(e) over e < n in kLanes interleaved partial sums, added in a fixed order at the end: independent chains,
// which the compiler vectorises (one running sum waits out the latency of every addition: a fifth of a statistics
// pass at 400 edges). Acc: double for the batch statistics, T for the gradients' sums over a tile's edges.
constexpr int64_t kLanes = 8;

template <typename Acc, typename F>
Acc lane_sum(int64_t n, const F& term) {
  Acc acc[kLanes] = {};
  int64_t e = 0;
  for (; e + kLanes <= n; e += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += term(e + j);
  for (; e < n; ++e) acc[0] += term(e);
  Acc s = 0;
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// ----------------------------------------------------------------------------------------------------------------
// large outputs
// ----------------------------------------------------------------------------------------------------------------
// An uninitialised tensor whose pages, when it is large, the kernel is asked to back with huge pages (Linux,
// transparent huge pages in "madvise" mode or "always"). Each step allocates its large outputs afresh (the activation
// and grids of the statistics passes, the weight gradients), and with 4 KB pages their first touch (page faults)
// costs more than the kernels' writes. An advice only: where it is refused, nothing changes.
Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  Tensor t = at::empty(sizes, opt);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = p + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && end > a + kHuge)
    madvise(reinterpret_cast<void*>(a), (end - a) & ~(kHuge - 1), MADV_HUGEPAGE);
#endif
  return t;
}

Tensor zeros_large(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  return zero_filled(empty_large(sizes, opt));
}

// ----------------------------------------------------------------------------------------------------------------
// work distribution
// ----------------------------------------------------------------------------------------------------------------
// fn(item, thread) for every item, items claimed dynamically by the threads of one parallel region
template <typename F>
void run_items(int64_t n_items, const F& fn) {
  if (n_items <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n_items);
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t tid = b; tid < e; ++tid) {
      for (int64_t i = next++; i < n_items; i = next++) fn(i, tid);
    }
  });
}

// per-thread buffers, kept from call to call (the pool's threads persist): a small graph's call allocates nothing
template <typename S>
S& scratch() {
  static thread_local S s;
  return s;
}

struct Item {
  int64_t r0, r1;  // receivers
  int64_t e0, e1;  // their edges
};

// receivers in runs of at most `ew` edges and `nrw` receivers (a receiver of higher degree alone)
std::vector<Item> make_items(const int64_t* rp, int64_t n_dst, int64_t ew, int64_t nrw) {
  std::vector<Item> items;
  int64_t r = 0;
  while (r < n_dst) {
    Item it{r, r, rp[r], rp[r]};
    while (it.r1 < n_dst && it.r1 - it.r0 < nrw && (it.r1 == it.r0 || rp[it.r1 + 1] - it.e0 <= ew)) {
      ++it.r1;
    }
    it.e1 = rp[it.r1];
    items.push_back(it);
    r = it.r1;
  }
  return items;
}

// edges per tile: a tile's widest buffer (max_rows x t) within about 256 KB (L2); on a small graph fewer, so that
// every thread gets about four tiles (a 400-edge graph in 7 tiles left one of 2 threads 4/7 of the work)
int64_t tile_edges(int64_t max_rows, int64_t E) {
  int64_t t = 65536 / std::max<int64_t>(1, max_rows);
  const int64_t share = (E + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads());
  t = std::min(t, (share + 7) & ~int64_t(7));
  t = std::max<int64_t>(8, std::min<int64_t>(256, t));
  return t & ~int64_t(7);
}

// ----------------------------------------------------------------------------------------------------------------
// the trunk on a tile
// ----------------------------------------------------------------------------------------------------------------
template <typename T>
struct TrunkTile {
  std::vector<std::vector<T>> X;  // X[k]: input of layer k (hin x t), after the batch norm; X[L]: the trunk's output
  std::vector<std::vector<T>> Apre;  // Apre[k]: layer k's activation before its batch norm (where it has one)
  std::vector<std::vector<T>> V;     // V[k]: Fourier ELU output on the grid (G*C x t)
  std::vector<const T*> Vp;  // Vp[k]: where the backward reads layer k's grid, rows of Vld[k]: V[k], or the tape's
  std::vector<int64_t> Vld;
  std::vector<T> Y, dA, dB;  // scratch
  // layer k's activation before its batch norm (hout x t)
  const T* act(const Layer<T>& l, int64_t k) const { return l.bn ? Apre[k].data() : X[k + 1].data(); }
};

template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

template <typename T>
inline void mk_gemm(int64_t m, int64_t n, int64_t k, const T* __restrict A, int64_t sam, int64_t sak,
                    const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc);

// the input component that component a of a componentwise Linear reads (a gated layer's gates: a trivial one)
template <typename T>
inline int64_t cw_source(const Layer<T>& l, int64_t a) {
  return l.src.empty() ? a : l.src[a];
}

// y = W x + b of layer l on a tile (x: hin x t, y: hlin x t, both in the tile layout)
template <typename T>
void layer_linear(const Layer<T>& l, const T* x, int64_t t, T* y) {
  if (l.cw) {  // D products of (C_out x C_in) by (C_in x t): too small for a BLAS call each; onto the bias
    for (int64_t i = 0; i < l.hlin; ++i) std::fill_n(y + i * t, t, l.b[i]);
    for (int64_t a = 0; a < l.D; ++a)
      mk_gemm<T>(l.cout, t, l.cin, l.W.data() + a * l.cout * l.cin, l.cin, 1, x + cw_source(l, a) * l.cin * t, t,
                 y + a * l.cout * t, t);
    return;
  }
  gemm<T>(false, false, l.hlin, t, l.hin, T(1), l.W.data(), l.hin, x, t, T(0), y, t);
  for (int64_t i = 0; i < l.hlin; ++i) {
    const T bi = l.b[i];
    T* row = y + i * t;
    for (int64_t e = 0; e < t; ++e) row[e] += bi;
  }
}

// the Fourier ELU's grid of a tile, v = ELU(A y) (G x C t), from y (Df x C t); with out, each of its G*C rows also
// written to out (rows of ld_out), in the ELU's pass (the tape's grid, see trunk_moments)
template <typename T>
void layer_grid(const Layer<T>& l, const T* y, int64_t t, std::vector<T>& V, T* out = nullptr, int64_t ld_out = 0) {
  const int64_t ct = l.C * t;
  T* v = grow(V, l.G * ct);
  gemm<T>(false, false, l.G, ct, l.Df, T(1), l.A.data(), l.Df, y, ct, T(0), v, ct);
  if (out == nullptr) {
    elu_inplace(v, l.G * ct);
    return;
  }
  for (int64_t r = 0; r < l.G * l.C; ++r) {
    elu_inplace(v + r * t, t);
    std::copy_n(v + r * t, t, out + r * ld_out);
  }
}

// A gated or norm layer's activation on a tile: out (hout x t) from its Linear's y (hlin x t), irrep by irrep (the
// rows of a component, every channel's, are C t contiguous numbers; program.h, Irreps). Trivial irreps: ELU;
// non-trivial ones scaled by m = sigmoid(gate) (gated) or sigmoid(|v| - act_bias) (norm), per channel and edge.
template <typename T>
void irreps_forward(const Layer<T>& l, const T* __restrict y, int64_t t, T* __restrict out) {
  const Irreps& ir = l.ir;
  const int64_t ct = ir.C * t;
  thread_local std::vector<T> buf;
  T* m = grow(buf, ct);
  for (size_t j = 0; j < ir.off.size(); ++j) {
    const T* yj = y + ir.off[j] * ct;
    T* oj = out + ir.off[j] * ct;
    const int64_t n = ir.size[j];
    if (ir.trivial[j]) {
      std::copy_n(yj, n * ct, oj);
      elu_inplace(oj, n * ct);
      continue;
    }
    const int64_t g = ir.nt_index[j];
    if (l.kind == kGated) {
      sigmoid_into(y + (ir.D + g) * ct, T(0), ct, m);
    } else {
      std::fill_n(m, ct, T(0));
      for (int64_t a = 0; a < n; ++a) {
        const T* v = yj + a * ct;
        for (int64_t i = 0; i < ct; ++i) m[i] += v[i] * v[i];
      }
      for (int64_t i = 0; i < ct; ++i) m[i] = std::sqrt(m[i]);
      for (int64_t c = 0; c < ir.C; ++c) sigmoid_into(m + c * t, l.nb[c * ir.n_nt + g], t, m + c * t);
    }
    for (int64_t a = 0; a < n; ++a) {
      const T* v = yj + a * ct;
      T* o = oj + a * ct;
      for (int64_t i = 0; i < ct; ++i) o[i] = v[i] * m[i];
    }
  }
}

// back through irreps_forward: dy (hlin x t) from d (hout x t, the gradient of out), y and out; a norm layer's
// act_bias gradient added to dnb (C * n_nt). For v scaled by m = sigmoid(u): dv = m d + (d . v) m (1 - m) du/dv, with
// u the gate (gated) or |v| - b (norm: du/dv = v / |v|, taken as 0 where |v| = 0; du/db = -1).
template <typename T>
void irreps_backward(const Layer<T>& l, const T* __restrict d, const T* __restrict y, const T* __restrict out,
                     int64_t t, T* __restrict dy, T* __restrict dnb) {
  const Irreps& ir = l.ir;
  const int64_t ct = ir.C * t;
  thread_local std::vector<T> buf;
  T* m = grow(buf, 3 * ct);
  T* dot = m + ct;
  T* nrm = m + 2 * ct;
  for (size_t j = 0; j < ir.off.size(); ++j) {
    const T* dj = d + ir.off[j] * ct;
    const T* yj = y + ir.off[j] * ct;
    T* dyj = dy + ir.off[j] * ct;
    const int64_t n = ir.size[j];
    if (ir.trivial[j]) {
      std::copy_n(dj, n * ct, dyj);
      elu_grad_inplace(dyj, out + ir.off[j] * ct, n * ct);
      continue;
    }
    const int64_t g = ir.nt_index[j];
    std::fill_n(dot, ct, T(0));
    for (int64_t a = 0; a < n; ++a) {
      const T* da = dj + a * ct;
      const T* v = yj + a * ct;
      for (int64_t i = 0; i < ct; ++i) dot[i] += da[i] * v[i];
    }
    if (l.kind == kGated) {
      sigmoid_into(y + (ir.D + g) * ct, T(0), ct, m);
      T* dgate = dy + (ir.D + g) * ct;
      for (int64_t i = 0; i < ct; ++i) dgate[i] = dot[i] * m[i] * (T(1) - m[i]);
    } else {
      std::fill_n(nrm, ct, T(0));
      for (int64_t a = 0; a < n; ++a) {
        const T* v = yj + a * ct;
        for (int64_t i = 0; i < ct; ++i) nrm[i] += v[i] * v[i];
      }
      for (int64_t i = 0; i < ct; ++i) nrm[i] = std::sqrt(nrm[i]);
      for (int64_t c = 0; c < ir.C; ++c) sigmoid_into(nrm + c * t, l.nb[c * ir.n_nt + g], t, m + c * t);
      // dot becomes (d . v) m (1 - m), the gradient of u; dnb -= its sum; then its factor on v, 1 / |v| (0 at 0)
      for (int64_t i = 0; i < ct; ++i) dot[i] *= m[i] * (T(1) - m[i]);
      for (int64_t c = 0; c < ir.C; ++c) {
        const T* r = dot + c * t;
        dnb[c * ir.n_nt + g] -= lane_sum<T>(t, [r](int64_t e) { return r[e]; });
      }
      for (int64_t i = 0; i < ct; ++i) dot[i] = nrm[i] > T(0) ? dot[i] / nrm[i] : T(0);
    }
    for (int64_t a = 0; a < n; ++a) {
      const T* da = dj + a * ct;
      const T* v = yj + a * ct;
      T* o = dyj + a * ct;
      if (l.kind == kGated) {
        for (int64_t i = 0; i < ct; ++i) o[i] = da[i] * m[i];
      } else {
        for (int64_t i = 0; i < ct; ++i) o[i] = da[i] * m[i] + v[i] * dot[i];
      }
    }
  }
}

// h = a * f + s row by row (rows x t; f, s per row): a batch norm's affine map on a tile
template <typename T>
void affine_rows(const T* __restrict a, const T* __restrict f, const T* __restrict s, int64_t rows, int64_t t,
                 T* __restrict h) {
  for (int64_t i = 0; i < rows; ++i) {
    const T fi = f[i], si = s[i];
    const T* ar = a + i * t;
    T* hr = h + i * t;
    for (int64_t e = 0; e < t; ++e) hr[e] = ar[e] * fi + si;
  }
}

// rows of the MLP input in the tile layout: x0 (n_in x t) from inp[0:t] (rows of ld_inp), through the input's batch
// norm where the trunk has one
template <typename T>
void load_input(const Trunk<T>& tr, const T* inp, int64_t ld_inp, int64_t t, TrunkTile<T>& S) {
  T* x0 = grow(S.X[0], tr.n_in * t);
  const bool bn = !tr.in_f.empty();
  for (int64_t i = 0; i < tr.n_in; ++i) {
    const int64_t col = tr.in_perm[i];
    T* row = x0 + i * t;
    if (bn) {
      const T f = tr.in_f[i], s = tr.in_s[i];
      for (int64_t e = 0; e < t; ++e) row[e] = inp[e * ld_inp + col] * f + s;
    } else {
      for (int64_t e = 0; e < t; ++e) row[e] = inp[e * ld_inp + col];
    }
  }
}

// the trunk of t edges, inputs inp[0:t] (rows of n_in, ld n_in); fills S.X, S.Apre and S.V; with grid_out, the last
// layer's grid is also written there (rows G*C of ld_grid)
template <typename T>
void trunk_forward(const Trunk<T>& tr, const T* inp, int64_t ld_inp, int64_t t, TrunkTile<T>& S, T* grid_out = nullptr,
                   int64_t ld_grid = 0) {
  const int64_t L = static_cast<int64_t>(tr.layers.size());
  S.X.resize(L + 1);
  S.Apre.resize(L);
  S.V.resize(L);
  S.Vp.assign(L, nullptr);
  S.Vld.assign(L, t);
  load_input(tr, inp, ld_inp, t, S);
  for (int64_t k = 0; k < L; ++k) {
    const Layer<T>& l = tr.layers[k];
    T* h = grow(S.X[k + 1], l.hout * t);
    T* out = l.bn ? grow(S.Apre[k], l.hout * t) : h;  // the activation, before the batch norm
    // (gated, norm: the Linear's output kept for the backward where the grid would be)
    T* y = l.G > 0 ? grow(S.Y, l.hout * t) : l.irreps() ? grow(S.V[k], l.hlin * t) : out;
    layer_linear(l, S.X[k].data(), t, y);
    if (l.irreps()) {
      irreps_forward(l, y, t, out);
      S.Vp[k] = y;
    } else if (l.G > 0) {
      const int64_t ct = l.C * t;
      layer_grid(l, y, t, S.V[k], k + 1 == L ? grid_out : nullptr, ld_grid);
      S.Vp[k] = S.V[k].data();
      gemm<T>(false, false, l.Df, ct, l.G, T(1), l.Ainv.data(), l.G, S.V[k].data(), ct, T(0), out, ct);
    } else {
      elu_inplace(out, l.hout * t);
    }
    if (l.bn) affine_rows(out, l.bnf.data(), l.bns.data(), l.hout, t, h);
  }
}

// the checked tape of ik_fast/ops.py: per hidden layer its activation before its batch norm (E, H_k) and, for a
// Fourier ELU, its grid (G, C, E); empty when the caller passed none
template <typename T>
struct Tape {
  std::vector<const T*> act, grid;
  int64_t E = 0;
  bool empty() const { return act.empty(); }
};

template <typename T>
Tape<T> check_tape(const Trunk<T>& tr, const c10::optional<TensorList>& tape, int64_t E, std::vector<Tensor>& keep) {
  Tape<T> tp;
  if (!tape.has_value() || tape->empty() || tr.layers.empty()) return tp;
  const int64_t L = static_cast<int64_t>(tr.layers.size());
  TORCH_CHECK(static_cast<int64_t>(tape->size()) == 2 * L,
              "ik_fast native: tape must hold 2 tensors per hidden layer "
              "(activation, grid) = ",
              2 * L, ", got ", tape->size());
  const auto dt = c10::CppTypeToScalarType<T>::value;
  tp.E = E;
  for (int64_t k = 0; k < L; ++k) {
    const Layer<T>& l = tr.layers[k];
    const Tensor& a = (*tape)[2 * k];
    const Tensor& g = (*tape)[2 * k + 1];
    TORCH_CHECK(a.scalar_type() == dt && g.scalar_type() == dt, "ik_fast native: tape[", 2 * k, "] and tape[",
                2 * k + 1, "] must have x's dtype ", dt, ", got ", a.scalar_type(), " and ", g.scalar_type());
    TORCH_CHECK(a.device().is_cpu() && g.device().is_cpu(), "ik_fast native: the CPU kernels got a tape on ",
                a.device(), " / ", g.device());
    TORCH_CHECK(a.dim() == 2 && a.size(0) == E && a.size(1) == l.hout, "ik_fast native: tape[", 2 * k,
                "] must be hidden layer ", k + 1, "'s activation (E, H) = (", E, ", ", l.hout, "), got shape ",
                a.sizes());
    if (l.G > 0 && g.numel() > 0) {
      TORCH_CHECK(g.dim() == 3 && g.size(0) == l.G && g.size(1) == l.C && g.size(2) == E, "ik_fast native: tape[",
                  2 * k + 1, "] must be hidden layer ", k + 1, "'s grid (G, C, E) = (", l.G, ", ", l.C, ", ", E,
                  ") or empty, got shape ", g.sizes());
    } else if (l.G == 0) {
      TORCH_CHECK(g.numel() == 0, "ik_fast native: tape[", 2 * k + 1, "] must be empty (hidden layer ", k + 1,
                  " has no Fourier grid), got shape ", g.sizes());
    }
    keep.push_back(a.contiguous());
    tp.act.push_back(keep.back().data_ptr<T>());
    keep.push_back(g.contiguous());
    tp.grid.push_back(l.G > 0 && g.numel() > 0 ? keep.back().data_ptr<T>() : nullptr);
  }
  return tp;
}

// S as trunk_forward would leave it for edges [e0, e0 + t), from the tape: the activations read, the grids read
// where the tape has them, else re-evaluated from the layer's input (its Linear and the first GEMM of its Fourier ELU:
// half of the layer's forward work, the other half, back from the grid, is the activation read)
template <typename T>
void trunk_from_tape(const Trunk<T>& tr, const Tape<T>& tp, const T* inp, int64_t ld_inp, int64_t e0, int64_t t,
                     TrunkTile<T>& S) {
  const int64_t L = static_cast<int64_t>(tr.layers.size());
  S.X.resize(L + 1);
  S.Apre.resize(L);
  S.V.resize(L);
  S.Vp.assign(L, nullptr);
  S.Vld.assign(L, t);
  load_input(tr, inp, ld_inp, t, S);
  for (int64_t k = 0; k < L; ++k) {
    const Layer<T>& l = tr.layers[k];
    T* h = grow(S.X[k + 1], l.hout * t);
    T* x = l.bn ? grow(S.Apre[k], l.hout * t) : h;
    const T* a = tp.act[k] + e0 * l.hout;
    for (int64_t e = 0; e < t; ++e)
      for (int64_t i = 0; i < l.hout; ++i) x[i * t + e] = a[e * l.hout + l.out_perm[i]];
    if (l.bn) affine_rows(x, l.bnf.data(), l.bns.data(), l.hout, t, h);  // a pass of its own: vectorised
    if (l.irreps()) {  // its Linear's output again (the tape keeps no gates)
      T* y = grow(S.V[k], l.hlin * t);
      layer_linear(l, S.X[k].data(), t, y);
      S.Vp[k] = y;
      continue;
    }
    if (l.G == 0) continue;
    if (tp.grid[k] != nullptr) {  // read where it is (trunk_backward reads it once)
      S.Vp[k] = tp.grid[k] + e0;
      S.Vld[k] = tp.E;
    } else {
      T* y = grow(S.Y, l.hout * t);
      layer_linear(l, S.X[k].data(), t, y);
      layer_grid(l, y, t, S.V[k]);
      S.Vp[k] = S.V[k].data();
      S.Vld[k] = t;
    }
  }
}

// g (rows x t) *= ELU'(u), from the ELU's output v (rows of ld_v): the tape's grid, read where it lies, or the tile's
template <typename T>
void elu_grad_rows(T* g, const T* v, int64_t rows, int64_t t, int64_t ld_v) {
  if (ld_v == t) {
    elu_grad_inplace(g, v, rows * t);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) elu_grad_inplace(g + r * t, v + r * ld_v, t);
}

// per-thread gradient accumulators of the trunk, in the tile layout
// (dbnf, dbns: per layout row of a layer with a batch norm, the sums over edges of dh * a and of dh; empty without;
// dnb: a norm layer's act_bias gradient, empty for other layers)
template <typename T>
struct TrunkGrads {
  std::vector<std::vector<T>> dW, db, dnb, dbnf, dbns;
  void init(const Trunk<T>& tr) {
    if (!dW.empty() || tr.layers.empty()) return;
    for (const auto& l : tr.layers) {
      dW.emplace_back(l.W.size(), T(0));
      db.emplace_back(l.hlin, T(0));
      dnb.emplace_back(l.nb.size(), T(0));
      dbnf.emplace_back(l.bn ? l.hout : 0, T(0));
      dbns.emplace_back(l.bn ? l.hout : 0, T(0));
    }
  }
};

// back through a batch norm h = a f + s on a tile (rows x t, f per row), one vectorised pass per row: df += sum_e dh a
// and ds += sum_e dh (per row; to channels in trunk_grads_out), dh *= f in place (da)
template <typename T>
void bn_backward_rows(T* __restrict d, const T* __restrict a, const T* __restrict f, int64_t rows, int64_t t,
                      T* __restrict df, T* __restrict ds) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  for (int64_t i = 0; i < rows; ++i) {
    T* row = d + i * t;
    const T* ar = a + i * t;
    const Vec fv(f[i]);
    Vec sf(T(0)), ss(T(0));
    int64_t e = 0;
    for (; e + V <= t; e += V) {
      const Vec g = Vec::loadu(row + e);
      sf = at::vec::fmadd(g, Vec::loadu(ar + e), sf);
      ss = ss + g;
      (g * fv).store(row + e);
    }
    T a_sum = 0, g_sum = 0;
    for (; e < t; ++e) {
      const T g = row[e];
      a_sum += g * ar[e];
      g_sum += g;
      row[e] = g * f[i];
    }
    T lf[V], ls[V];
    sf.store(lf);
    ss.store(ls);
    for (int64_t j = 0; j < V; ++j) {
      a_sum += lf[j];
      g_sum += ls[j];
    }
    df[i] += a_sum;
    ds[i] += g_sum;
  }
}

// back through the trunk of a tile (S from trunk_forward): dact (width x t, the gradient of the trunk's output, after
// the last batch norm) is consumed; d(inp) (n_in x t, layout order) is left in the returned buffer
template <typename T>
T* trunk_backward(const Trunk<T>& tr, TrunkTile<T>& S, T* dact, int64_t t, TrunkGrads<T>& G) {
  const int64_t L = static_cast<int64_t>(tr.layers.size());
  G.init(tr);
  T* d = dact;
  for (int64_t k = L - 1; k >= 0; --k) {
    const Layer<T>& l = tr.layers[k];
    if (l.bn) bn_backward_rows(d, S.Apre[k].data(), l.bnf.data(), l.hout, t, G.dbnf[k].data(), G.dbns[k].data());
    T* dy;
    if (l.irreps()) {  // (hlin x t: a gated layer's gates too)
      dy = grow(S.Y, l.hlin * t);
      irreps_backward(l, d, S.Vp[k], S.act(l, k), t, dy, G.dnb[k].data());
    } else if (l.G > 0) {
      const int64_t ct = l.C * t;
      T* dv = grow(S.Y, l.G * ct);
      gemm<T>(true, false, l.G, ct, l.Df, T(1), l.Ainv.data(), l.G, d, ct, T(0), dv, ct);
      elu_grad_rows(dv, S.Vp[k], l.G * l.C, t, S.Vld[k]);
      dy = d;  // (Df x C t) = hout x t, overwrites d
      gemm<T>(true, false, l.Df, ct, l.G, T(1), l.A.data(), l.Df, dv, ct, T(0), dy, ct);
    } else {
      elu_grad_inplace(d, S.act(l, k), l.hout * t);
      dy = d;
    }
    T* db = G.db[k].data();
    for (int64_t i = 0; i < l.hlin; ++i) {
      const T* row = dy + i * t;
      db[i] += lane_sum<T>(t, [row](int64_t e) { return row[e]; });
    }
    const T* x = S.X[k].data();
    std::vector<T>& nb = (d == S.dA.data()) ? S.dB : S.dA;
    T* dx = grow(nb, l.hin * t);
    if (l.cw) {  // per component: dW_a += dy_a x_a^T (C_out x C_in dot products over the tile), dx_a = W_a^T dy_a
      std::fill_n(dx, l.hin * t, T(0));
      for (int64_t a = 0; a < l.D; ++a) {
        const T* dya = dy + a * l.cout * t;
        const T* xa = x + cw_source(l, a) * l.cin * t;
        T* dW = G.dW[k].data() + a * l.cout * l.cin;
        for (int64_t i = 0; i < l.cout; ++i)
          for (int64_t j = 0; j < l.cin; ++j) {
            const T* u = dya + i * t;
            const T* v = xa + j * t;
            dW[i * l.cin + j] += lane_sum<T>(t, [u, v](int64_t e) { return u[e] * v[e]; });
          }
        mk_gemm<T>(l.cin, t, l.cout, l.W.data() + a * l.cout * l.cin, 1, l.cin, dya, t,
                   dx + cw_source(l, a) * l.cin * t, t);
      }
    } else {
      gemm<T>(false, true, l.hlin, l.hin, t, T(1), dy, t, x, t, T(1), G.dW[k].data(), l.hin);
      gemm<T>(true, false, l.hin, t, l.hlin, T(1), l.W.data(), l.hin, dy, t, T(0), dx, t);
    }
    d = dx;
  }
  return d;
}

// the trunk's gradients in the op's layout (weights as given: dense channel-major or componentwise), in
// conv_backward's order: dweights, dbiases, dact_bias, dbn_factor, dbn_shift (empty tensors for a layer that is not
// norm, and for a layer without batch norm)
template <typename T>
void trunk_grads_out(const Trunk<T>& tr, const TrunkGrads<T>& G, TensorList weights, TensorList biases,
                     TensorList act_bias, TensorList bn_factor, TensorList bn_shift, std::vector<Tensor>& out) {
  const int64_t L = static_cast<int64_t>(tr.layers.size());
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  std::vector<Tensor> dws, dbs, das, dfs, dss;
  for (int64_t k = 0; k < L; ++k) {
    const Layer<T>& l = tr.layers[k];
    if (l.kind == kNorm) {
      Tensor da = at::zeros({static_cast<int64_t>(l.nb.size())}, opt);
      if (!G.dnb.empty()) std::copy(G.dnb[k].begin(), G.dnb[k].end(), da.data_ptr<T>());
      das.push_back(da.view(act_bias[k].sizes()).to(act_bias[k].scalar_type()));
    } else {
      das.push_back(at::empty({0}, act_bias[k].options()));
    }
    Tensor dw = at::zeros(weights[k].sizes(), opt);
    Tensor db = at::zeros({l.hlin}, opt);
    if (!G.dW.empty()) {
      T* pw = dw.data_ptr<T>();
      if (l.cw) {
        std::copy(G.dW[k].begin(), G.dW[k].end(), pw);
      } else {
        const auto& in_perm = k == 0 ? tr.in_perm : tr.layers[k - 1].out_perm;
        for (int64_t i = 0; i < l.hlin; ++i)
          for (int64_t j = 0; j < l.hin; ++j) pw[l.lin_perm[i] * l.hin + in_perm[j]] = G.dW[k][i * l.hin + j];
      }
      T* pb = db.data_ptr<T>();
      for (int64_t i = 0; i < l.hlin; ++i) pb[l.lin_perm[i]] = G.db[k][i];
    }
    dws.push_back(dw.to(weights[k].scalar_type()));
    dbs.push_back(db.view(biases[k].sizes()).to(biases[k].scalar_type()));
    if (!l.bn) {
      dfs.push_back(at::empty({0}, bn_factor[k].options()));
      dss.push_back(at::empty({0}, bn_shift[k].options()));
      continue;
    }
    Tensor df = at::zeros({l.bn_C}, opt);
    Tensor ds = at::zeros({l.hout}, opt);
    if (!G.dbnf.empty()) {
      T* pf = df.data_ptr<T>();
      T* ps = ds.data_ptr<T>();
      for (int64_t i = 0; i < l.hout; ++i) {  // rows in layout order: a fixed summation order per channel
        pf[l.bn_ch[i]] += G.dbnf[k][i];
        ps[l.out_perm[i]] = G.dbns[k][i];
      }
    }
    dfs.push_back(df.view(bn_factor[k].sizes()).to(bn_factor[k].scalar_type()));
    dss.push_back(ds.view(bn_shift[k].sizes()).to(bn_shift[k].scalar_type()));
  }
  for (auto* v : {&dws, &dbs, &das, &dfs, &dss}) out.insert(out.end(), v->begin(), v->end());
}

template <typename T>
void sum_into(std::vector<T>& acc, const std::vector<T>& v) {
  if (v.empty()) return;
  if (acc.empty()) acc.assign(v.size(), T(0));
  for (size_t i = 0; i < v.size(); ++i) acc[i] += v[i];
}

// ----------------------------------------------------------------------------------------------------------------
// the contraction's small loops (per pair, per receiver)
// ----------------------------------------------------------------------------------------------------------------
// C (m x n, ldc) += A B with A (m x k) read as scalars at A[i * sam + kk * sak] and B (k x n, ldb), both B and C
// contiguous along n: register blocks of 4 rows x 2 vectors. The contraction's three small products are all of
// this form (Z^T += X^T H_s, dH_s += X dZ^T, dX += H_s dZ), with every size of the order of 16.
// one column block of mk_gemm: C[:, j:j+w] += A B[:, j:j+w] for w <= 2V, B's block contiguous along n with ldb
template <typename T>
inline void mk_block(int64_t m, int64_t w, int64_t k, const T* __restrict A, int64_t sam, int64_t sak,
                     const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const bool full = w == 2 * V;
  const int64_t w0 = std::min<int64_t>(w, V), w1 = std::max<int64_t>(0, w - V);
  auto ld = [&](const T* p, int64_t n) { return n == V ? Vec::loadu(p) : Vec::loadu(p, n); };
  auto st = [&](const Vec& v, T* p, int64_t n) {
    if (n == V) {
      v.store(p);
    } else if (n > 0) {
      v.store(p, n);
    }
  };
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    T* c = C + i * ldc;
    Vec c00 = ld(c, w0), c01 = w1 ? ld(c + V, w1) : Vec(T(0));
    Vec c10 = ld(c + ldc, w0), c11 = w1 ? ld(c + ldc + V, w1) : Vec(T(0));
    Vec c20 = ld(c + 2 * ldc, w0), c21 = w1 ? ld(c + 2 * ldc + V, w1) : Vec(T(0));
    Vec c30 = ld(c + 3 * ldc, w0), c31 = w1 ? ld(c + 3 * ldc + V, w1) : Vec(T(0));
    const T* a = A + i * sam;
    for (int64_t kk = 0; kk < k; ++kk) {
      const T* bb = B + kk * ldb;
      const Vec b0 = Vec::loadu(bb), b1 = Vec::loadu(bb + V);
      const T* ak = a + kk * sak;
      const Vec a0(ak[0]), a1(ak[sam]), a2(ak[2 * sam]), a3(ak[3 * sam]);
      c00 = at::vec::fmadd(a0, b0, c00);
      c01 = at::vec::fmadd(a0, b1, c01);
      c10 = at::vec::fmadd(a1, b0, c10);
      c11 = at::vec::fmadd(a1, b1, c11);
      c20 = at::vec::fmadd(a2, b0, c20);
      c21 = at::vec::fmadd(a2, b1, c21);
      c30 = at::vec::fmadd(a3, b0, c30);
      c31 = at::vec::fmadd(a3, b1, c31);
    }
    if (full) {
      c00.store(c);
      c01.store(c + V);
      c10.store(c + ldc);
      c11.store(c + ldc + V);
      c20.store(c + 2 * ldc);
      c21.store(c + 2 * ldc + V);
      c30.store(c + 3 * ldc);
      c31.store(c + 3 * ldc + V);
    } else {
      st(c00, c, w0);
      st(c01, c + V, w1);
      st(c10, c + ldc, w0);
      st(c11, c + ldc + V, w1);
      st(c20, c + 2 * ldc, w0);
      st(c21, c + 2 * ldc + V, w1);
      st(c30, c + 3 * ldc, w0);
      st(c31, c + 3 * ldc + V, w1);
    }
  }
  for (; i < m; ++i) {
    T* c = C + i * ldc;
    Vec c0 = ld(c, w0), c1 = w1 ? ld(c + V, w1) : Vec(T(0));
    for (int64_t kk = 0; kk < k; ++kk) {
      const Vec a0(A[i * sam + kk * sak]);
      c0 = at::vec::fmadd(a0, Vec::loadu(B + kk * ldb), c0);
      c1 = at::vec::fmadd(a0, Vec::loadu(B + kk * ldb + V), c1);
    }
    st(c0, c, w0);
    st(c1, c + V, w1);
  }
}

// C (m x n, ldc) += A B with A (m x k) read as scalars at A[i * sam + kk * sak] and B (k x n, ldb), both B and C
// contiguous along n: register blocks of 4 rows x 2 vectors. The contraction's small products are all of this form
// (Z^T += X^T H_s, dH_s += X dZ^T, dX^T += dZ^T H_s^T, and W' against Z), with sizes of the order of 16 to 300. The
// last column block, narrower than 2 vectors, runs on a zero-padded copy of B's columns.
template <typename T>
inline void mk_gemm(int64_t m, int64_t n, int64_t k, const T* __restrict A, int64_t sam, int64_t sak,
                    const T* __restrict B, int64_t ldb, T* __restrict C, int64_t ldc) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  if (m <= 0 || n <= 0 || k <= 0) return;
  int64_t j = 0;
  for (; j + 2 * V <= n; j += 2 * V) mk_block<T>(m, 2 * V, k, A, sam, sak, B + j, ldb, C + j, ldc);
  if (j < n) {
    const int64_t w = n - j;
    thread_local std::vector<T> pad;
    if (static_cast<int64_t>(pad.size()) < k * 2 * V) pad.resize(k * 2 * V);
    for (int64_t kk = 0; kk < k; ++kk) {
      T* row = pad.data() + kk * 2 * V;
      std::copy(B + kk * ldb + j, B + kk * ldb + n, row);
      std::fill(row + w, row + 2 * V, T(0));
    }
    mk_block<T>(m, w, k, A, sam, sak, pad.data(), 2 * V, C + j, ldc);
  }
}

// ----------------------------------------------------------------------------------------------------------------
// conv: shared state of a call
// ----------------------------------------------------------------------------------------------------------------
template <typename T>
struct Conv {
  Trunk<T> tr;
  std::shared_ptr<const Plan> plan;
  std::vector<T> B;  // packed W' (the plan's dense blocks)
  std::vector<T> Bb;  // B' (R x C)
  std::vector<int64_t> act_row;  // plan position -> row of the last activation (tile layout)
  std::vector<T> hf, hs;  // plan position -> the last batch norm's factor and shift (empty: none)
  const T* x = nullptr;
  const T* inp = nullptr;
  const int64_t* src = nullptr;
  const int64_t* rp = nullptr;
  int64_t n_in = 0, C = 0, R = 0, ndim = 0, t = 0;
  T coef = 0, norm = 1;
  int64_t P() const { return static_cast<int64_t>(plan->hidden.size()); }
};

// per-thread buffers of the contraction
template <typename T>
// what a chunk of an item's edges keeps between the sweeps of the backward
struct Chunk {
  TrunkTile<T> trunk;
  std::vector<T> s, d2, hp, hs, hsf;  // hp, hs edge-major (t x P); hsf = hs feature-major (P x t)
  std::vector<std::vector<T>> xq;  // per column permutation, (t x len)
};

constexpr int64_t kKeepChunks = 4;  // chunks of an item kept from the backward's first sweep to its second

template <typename T>
struct ConvTile {
  std::vector<Chunk<T>> chunks;
  std::vector<T> dhs, dact, Z, z, dZ, dz, out, tmp, dg, dxe;
  std::vector<std::vector<T>> dxq;  // per column permutation, feature-major (len x t)
};

// edges [c0, c1) of an item: radial factors, plan-ordered activations hp and hs = s * hp, and permuted sources
template <typename T>
void load_chunk(const Conv<T>& cv, Chunk<T>& W, int64_t c0, int64_t c1, const T* hidden, int64_t ld_hidden,
                const Tape<T>* tape = nullptr) {
  const int64_t t = c1 - c0, P = cv.P();
  T* s = grow(W.s, t);
  T* d2 = grow(W.d2, t);
  for (int64_t e = 0; e < t; ++e) {
    const T* row = cv.inp + (c0 + e) * cv.n_in;
    T r2 = T(0);
    for (int64_t k = 0; k < cv.ndim; ++k) r2 += row[k] * row[k];
    d2[e] = r2;
    s[e] = cv.norm * std::exp(-cv.coef * r2);
  }
  T* hp = grow(W.hp, P * t);  // (t x P), edge-major
  T* hs = grow(W.hs, P * t);
  const int64_t* hid = cv.plan->hidden.data();
  if (hidden != nullptr) {  // the last activation before its batch norm: the batch norm applied here
    const T* hf = cv.hf.empty() ? nullptr : cv.hf.data();
    const T* hb = cv.hs.data();
    for (int64_t e = 0; e < t; ++e) {
      const T* row = hidden + (c0 + e) * ld_hidden;
      if (hf == nullptr) {
        for (int64_t i = 0; i < P; ++i) hp[e * P + i] = row[hid[i]];
      } else {
        for (int64_t i = 0; i < P; ++i) hp[e * P + i] = row[hid[i]] * hf[i] + hb[i];
      }
    }
  } else {
    if (tape != nullptr && !tape->empty()) {
      trunk_from_tape(cv.tr, *tape, cv.inp + c0 * cv.n_in, cv.n_in, c0, t, W.trunk);
    } else {
      trunk_forward(cv.tr, cv.inp + c0 * cv.n_in, cv.n_in, t, W.trunk);
    }
    const T* act = W.trunk.X.back().data();
    for (int64_t i = 0; i < P; ++i) {
      const T* row = act + cv.act_row[i] * t;
      for (int64_t e = 0; e < t; ++e) hp[e * P + i] = row[e];
    }
  }
  T* hsf = grow(W.hsf, P * t);
  for (int64_t e = 0; e < t; ++e)
    for (int64_t i = 0; i < P; ++i) hsf[i * t + e] = hs[e * P + i] = hp[e * P + i] * s[e];
  const auto& perms = cv.plan->perms;
  W.xq.resize(perms.size());
  for (size_t q = 0; q < perms.size(); ++q) {
    const int64_t nq = static_cast<int64_t>(perms[q].size());
    T* xq = grow(W.xq[q], t * nq);
    for (int64_t e = 0; e < t; ++e) {
      const T* xr = cv.x + cv.src[c0 + e] * cv.C;
      for (int64_t j = 0; j < nq; ++j) xq[e * nq + j] = xr[perms[q][j]];
    }
  }
}

// Z and z of an item's receivers from the chunk [c0, c1) loaded in W
template <typename T>
void accumulate_z(const Conv<T>& cv, const Chunk<T>& W, T* Z, T* z, const Item& it, int64_t c0, int64_t c1) {
  const int64_t zs = cv.plan->zsize, P = cv.P();
  for (const Group& g : cv.plan->groups) {
    const int64_t lq = static_cast<int64_t>(cv.plan->perms[g.q].size());
    const T* xq = W.xq[g.q].data();
    for (int64_t r = it.r0; r < it.r1; ++r) {
      const int64_t ea = std::max(cv.rp[r], c0) - c0, eb = std::min(cv.rp[r + 1], c1) - c0;
      if (ea >= eb) continue;
      // Z_g^T (lq x nh) += X_q^T (lq x deg) H_s (deg x nh)
      mk_gemm<T>(lq, g.nh, eb - ea, xq + ea * lq, 1, lq, W.hs.data() + ea * P + g.hoff, P,
                 Z + (r - it.r0) * zs + g.zoff, g.nh);
    }
  }
  for (int64_t r = it.r0; r < it.r1; ++r) {
    const int64_t ea = std::max(cv.rp[r], c0) - c0, eb = std::min(cv.rp[r + 1], c1) - c0;
    T* zr = z + (r - it.r0) * cv.C;
    for (int64_t e = ea; e < eb; ++e) {
      const T* xr = cv.x + cv.src[c0 + e] * cv.C;
      const T se = W.s[e];
      for (int64_t c = 0; c < cv.C; ++c) zr[c] += se * xr[c];
    }
  }
}

// every floating argument in the compute dtype (the gradients keep their inputs' dtypes, so none is converted);
// a batch norm's tensors where it has one (an empty entry stands for none)
void check_same_dtype(const Tensor& x, const Tensor& inp, TensorList weights, TensorList biases, TensorList factors,
                      TensorList shifts, const char* factor_name, const char* shift_name, const Tensor& final_weight,
                      const Tensor& final_bias, const Tensor& coef) {
  const auto dt = x.scalar_type();
  auto check = [&](const Tensor& t, const std::string& name) {
    TORCH_CHECK(t.scalar_type() == dt, "ik_fast native: ", name, " must have x's dtype ", dt, ", got ",
                t.scalar_type());
  };
  if (inp.defined()) check(inp, "inp");
  for (size_t k = 0; k < weights.size(); ++k) check(weights[k], "weights[" + std::to_string(k) + "]");
  for (size_t k = 0; k < biases.size(); ++k) check(biases[k], "biases[" + std::to_string(k) + "]");
  for (size_t k = 0; k < factors.size(); ++k)
    if (factors[k].numel() > 0) check(factors[k], factor_name + ("[" + std::to_string(k) + "]"));
  for (size_t k = 0; k < shifts.size(); ++k)
    if (shifts[k].numel() > 0) check(shifts[k], shift_name + ("[" + std::to_string(k) + "]"));
  if (final_weight.defined()) check(final_weight, "final_weight");
  if (final_bias.defined()) check(final_bias, "final_bias");
  if (coef.defined()) check(coef, "coef");
}

template <typename T>
Conv<T> make_conv(const Tensor& x, const Tensor& inp, const Tensor& src, const Tensor& rowptr, TensorList weights,
                  TensorList biases, TensorList fourier, TensorList fourier_inv, TensorList act_bias,
                  TensorList bn_factor, TensorList bn_shift, const Tensor& final_weight, const Tensor& final_bias,
                  const Tensor& coef, double norm, int64_t ndim, const std::optional<c10::string_view>& structure) {
  // the layers' kinds first: a gated layer's weights have its gates too
  check_activations(structure, 0, static_cast<int64_t>(weights.size()), act_bias, "native", "ik_fast native",
                    /*gated_and_norm=*/true);
  Conv<T> cv;
  const int64_t E = inp.size(0);
  TORCH_CHECK(x.dim() == 2, "ik_fast native: x must be (n_src, C_in), got shape ", x.sizes());
  TORCH_CHECK(inp.dim() == 2, "ik_fast native: inp must be (E, n_in), got shape ", inp.sizes());
  TORCH_CHECK(src.dim() == 1 && src.size(0) == E, "ik_fast native: src must be (E,) = (", E, ",), got shape ",
              src.sizes());
  TORCH_CHECK(src.scalar_type() == at::kLong && rowptr.scalar_type() == at::kLong,
              "ik_fast native: src and rowptr must be int64, got ", src.scalar_type(), " and ", rowptr.scalar_type());
  TORCH_CHECK(rowptr.dim() == 1 && rowptr.size(0) >= 1, "ik_fast native: rowptr must be (n_dst + 1,), got shape ",
              rowptr.sizes());
  TORCH_CHECK(final_weight.dim() == 3, "ik_fast native: final_weight must be (R, H, C_in), got shape ",
              final_weight.sizes());
  cv.R = final_weight.size(0);
  cv.C = final_weight.size(2);
  TORCH_CHECK(x.size(1) == cv.C, "ik_fast native: x has ", x.size(1),
              " columns but final_weight expects C_in = ", cv.C);
  TORCH_CHECK(final_bias.numel() == cv.R * cv.C, "ik_fast native: final_bias must be (R, C_in) = (", cv.R, ", ", cv.C,
              "), got shape ", final_bias.sizes());
  TORCH_CHECK(coef.numel() == 1, "ik_fast native: coef must have one element, got shape ", coef.sizes());
  TORCH_CHECK(ndim >= 0 && ndim <= inp.size(1), "ik_fast native: ndim = ", ndim, " is outside [0, ", inp.size(1), "]");
  for (const Tensor* t : {&x, &inp, &src, &rowptr, &final_weight, &final_bias, &coef})
    TORCH_CHECK(t->device().is_cpu(), "ik_fast native: the CPU kernels got a tensor on ", t->device());
  check_same_dtype(x, inp, weights, biases, bn_factor, bn_shift, "bn_factor", "bn_shift", final_weight, final_bias,
                   coef);
  {  // the CSR: every edge of a receiver row, sources inside x (the kernels index with them unchecked)
    const int64_t* rp = rowptr.data_ptr<int64_t>();
    const int64_t n = rowptr.size(0) - 1;
    TORCH_CHECK(rp[0] == 0 && rp[n] == E, "ik_fast native: rowptr must start at 0 and end at E = ", E, ", got ", rp[0],
                " and ", rp[n]);
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(rp[i] <= rp[i + 1], "ik_fast native: rowptr must be non-decreasing (row ", i, ")");
    const int64_t* ps = src.data_ptr<int64_t>();
    const int64_t n_src = x.size(0);
    int64_t bad = 0;
    for (int64_t e = 0; e < E; ++e) bad += (ps[e] < 0) | (ps[e] >= n_src);
    TORCH_CHECK(bad == 0, "ik_fast native: src has ", bad, " entries outside [0, n_src = ", n_src, ")");
  }
  cv.n_in = inp.size(1);
  cv.ndim = ndim;
  Affines bn;
  bn.factor.assign(bn_factor.begin(), bn_factor.end());
  bn.shift.assign(bn_shift.begin(), bn_shift.end());
  const auto st = structure.has_value() ? parse_structure(*structure, "ik_fast native") : nullptr;
  cv.tr = make_trunk<T>(cv.n_in, weights, biases, fourier, fourier_inv, act_bias, bn, st.get(), 0);
  const int64_t H = final_weight.size(1);
  TORCH_CHECK(cv.tr.width() == H, "ik_fast native: final_weight has H = ", H, " hidden units but the trunk gives ",
              cv.tr.width());
  cv.plan = plan_for(structure, cv.R, H, cv.C);
  // the last activation's layout row of each plan position
  std::vector<int64_t> row_of(H);
  const auto& lp = cv.tr.last_perm();
  for (int64_t i = 0; i < H; ++i) row_of[lp[i]] = i;
  for (int64_t h : cv.plan->hidden) cv.act_row.push_back(row_of[h]);
  if (!cv.tr.layers.empty() && cv.tr.layers.back().bn) {  // for a `hidden` given before the last batch norm
    const Layer<T>& last = cv.tr.layers.back();
    for (int64_t r : cv.act_row) {
      cv.hf.push_back(last.bnf[r]);
      cv.hs.push_back(last.bns[r]);
    }
  }
  Tensor fw = final_weight.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const T* pw = fw.data_ptr<T>();
  cv.B.resize(cv.plan->widx.size());
  for (size_t i = 0; i < cv.B.size(); ++i) cv.B[i] = pw[cv.plan->widx[i]];
  Tensor fb = final_bias.to(c10::CppTypeToScalarType<T>::value).contiguous();
  cv.Bb.assign(fb.data_ptr<T>(), fb.data_ptr<T>() + cv.R * cv.C);
  cv.coef = coef.to(at::kDouble).item<double>();
  cv.norm = static_cast<T>(norm);
  cv.t = tile_edges(std::max(cv.tr.max_rows(), cv.P()), E);
  return cv;
}

template <typename T>
std::vector<Item> conv_items(const Conv<T>& cv, int64_t n_dst) {
  const int64_t nrw =
      std::max<int64_t>(1, std::min<int64_t>(64, (int64_t(1) << 20) / std::max<int64_t>(1, cv.plan->zsize)));
  return make_items(cv.rp, n_dst, 4 * cv.t, nrw);
}

template <typename T>
Tensor conv_impl(const Tensor& x_, const Tensor& inp_, const Tensor& src_, const Tensor& rowptr_, TensorList weights,
                 TensorList biases, TensorList fourier, TensorList fourier_inv, TensorList act_bias,
                 TensorList bn_factor, TensorList bn_shift, const Tensor& final_weight, const Tensor& final_bias,
                 const Tensor& coef, double norm, int64_t ndim, const std::optional<c10::string_view>& structure,
                 const c10::optional<Tensor>& hidden_, const c10::optional<TensorList>& tape) {
  const auto dt = c10::CppTypeToScalarType<T>::value;
  Tensor x = x_.contiguous(), inp = inp_.to(dt).contiguous(), src = src_.contiguous(), rowptr = rowptr_.contiguous();
  Conv<T> cv = make_conv<T>(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift,
                            final_weight, final_bias, coef, norm, ndim, structure);
  const int64_t n_dst = rowptr.size(0) - 1, E = inp.size(0);
  Tensor out = at::zeros({n_dst, cv.R}, x.options());
  if (E == 0 || n_dst == 0) return out;
  Tensor hidden;
  std::vector<Tensor> tape_keep;
  const Tape<T> tp = check_tape(cv.tr, tape, E, tape_keep);
  if (!(hidden_.has_value() && hidden_->defined()) && !tp.empty()) hidden = tape_keep[tape_keep.size() - 2];
  if (hidden_.has_value() && hidden_->defined()) {
    TORCH_CHECK(hidden_->scalar_type() == dt, "ik_fast native: hidden must have x's dtype ", dt, ", got ",
                hidden_->scalar_type());
    hidden = hidden_->contiguous();
    TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == E && hidden.size(1) == cv.tr.width(),
                "ik_fast native: hidden must be (E, H) = (", E, ", ", cv.tr.width(), "), got shape ", hidden.sizes());
  }
  cv.x = x.data_ptr<T>();
  cv.inp = inp.data_ptr<T>();
  cv.src = src.data_ptr<int64_t>();
  cv.rp = rowptr.data_ptr<int64_t>();
  const T* ph = hidden.defined() ? hidden.data_ptr<T>() : nullptr;
  const int64_t H = cv.tr.width();
  const auto items = conv_items(cv, n_dst);
  T* po = out.data_ptr<T>();
  const int64_t zs = cv.plan->zsize, R = cv.R, C = cv.C;
  std::vector<T> BT(cv.B.size());  // every pair's block of W' transposed, (K x nr)
  for (const Pair& p : cv.plan->pairs) {
    const int64_t K = p.nh * p.nc;
    for (int64_t ri = 0; ri < p.nr; ++ri)
      for (int64_t k = 0; k < K; ++k) BT[p.boff + k * p.nr + ri] = cv.B[p.boff + ri * K + k];
  }
  run_items(static_cast<int64_t>(items.size()), [&](int64_t ii, int64_t tid) {
    const Item& it = items[ii];
    if (it.e0 == it.e1) return;
    ConvTile<T>& W = scratch<ConvTile<T>>();
    const int64_t nr = it.r1 - it.r0;
    std::fill_n(grow(W.Z, nr * zs), nr * zs, T(0));
    std::fill_n(grow(W.z, nr * C), nr * C, T(0));
    W.chunks.resize(1);
    for (int64_t c0 = it.e0; c0 < it.e1; c0 += cv.t) {
      const int64_t c1 = std::min(it.e1, c0 + cv.t);
      load_chunk(cv, W.chunks[0], c0, c1, ph, H);
      accumulate_z(cv, W.chunks[0], W.Z.data(), W.z.data(), it, c0, c1);
    }
    T* o = po + it.r0 * R;  // rows of this item only: written by this thread alone
    for (const Pair& p : cv.plan->pairs) {
      const int64_t K = p.nh * p.nc;
      T* tmp = grow(W.tmp, nr * p.nr);
      // out_p (nr x p.nr) = Z_p (nr x K) W'_p^T: the small kernel on the transposed block (BLAS would repack W'_p
      // for every item)
      std::fill_n(tmp, nr * p.nr, T(0));
      mk_gemm<T>(nr, p.nr, K, W.Z.data() + p.zoff, zs, 1, BT.data() + p.boff, p.nr, tmp, p.nr);
      const int64_t* rows = cv.plan->rows.data() + p.roff;
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < p.nr; ++j) o[r * R + rows[j]] += tmp[r * p.nr + j];
    }
    gemm<T>(false, true, nr, R, C, T(1), W.z.data(), C, cv.Bb.data(), C, T(1), o, R);
  });
  return out;
}

// ----------------------------------------------------------------------------------------------------------------
// conv_backward
// ----------------------------------------------------------------------------------------------------------------
constexpr int64_t kSlots = 8;  // gradient accumulators of the backward (see conv_backward_impl)

template <typename T>
struct alignas(64) ConvGrads {  // one per slot, on its own cache lines
  TrunkGrads<T> trunk;
  std::vector<T> dB, dBb, dx;
  double dcoef = 0;
  bool used = false;
};

template <typename T>
std::vector<Tensor> conv_backward_impl(const Tensor& grad_, const Tensor& x_, const Tensor& inp_, const Tensor& src_,
                                       const Tensor& rowptr_, TensorList weights, TensorList biases, TensorList fourier,
                                       TensorList fourier_inv, TensorList act_bias, TensorList bn_factor,
                                       TensorList bn_shift, const Tensor& final_weight, const Tensor& final_bias,
                                       const Tensor& coef, double norm, int64_t ndim,
                                       const std::optional<c10::string_view>& structure,
                                       const c10::optional<TensorList>& tape) {
  const auto dt = c10::CppTypeToScalarType<T>::value;
  Tensor x = x_.contiguous(), inp = inp_.to(dt).contiguous(), src = src_.contiguous(), rowptr = rowptr_.contiguous();
  Conv<T> cv = make_conv<T>(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift,
                            final_weight, final_bias, coef, norm, ndim, structure);
  const int64_t n_dst = rowptr.size(0) - 1, E = inp.size(0), n_src = x.size(0);
  const int64_t R = cv.R, C = cv.C, zs = cv.plan->zsize, P = cv.P(), H = cv.tr.width();
  TORCH_CHECK(grad_.dim() == 2 && grad_.size(0) == n_dst && grad_.size(1) == R,
              "ik_fast native: grad must be (n_dst, R) = (", n_dst, ", ", R, "), got shape ", grad_.sizes());
  TORCH_CHECK(grad_.scalar_type() == dt, "ik_fast native: grad must have x's dtype ", dt, ", got ",
              grad_.scalar_type());
  Tensor grad = grad_.contiguous();
  cv.x = x.data_ptr<T>();
  cv.inp = inp.data_ptr<T>();
  cv.src = src.data_ptr<int64_t>();
  cv.rp = rowptr.data_ptr<int64_t>();
  const T* pg = grad.data_ptr<T>();
  std::vector<Tensor> tape_keep;
  const Tape<T> tp = check_tape(cv.tr, tape, E, tape_keep);
  Tensor dinp = zeros_large({E, cv.n_in}, inp.options());
  T* pdi = dinp.data_ptr<T>();
  const auto items = E > 0 ? conv_items(cv, n_dst) : std::vector<Item>{};
  const int64_t n_items = static_cast<int64_t>(items.size());
  // The gradients accumulate per slot, a fixed run of items summed in item order, and the slots are summed in slot
  // order: the threads claim slots, but which thread ran a slot does not change a bit of the result, whatever the
  // thread count (kSlots, not the thread count, fixes the summation order).
  const int64_t n_slots = std::min<int64_t>(kSlots, n_items);
  std::vector<ConvGrads<T>> acc(n_slots);
  const T minus2coef = T(-2) * cv.coef;
  auto item_backward = [&](int64_t ii, ConvGrads<T>& A) {
    const Item& it = items[ii];
    if (it.e0 == it.e1) return;
    ConvTile<T>& W = scratch<ConvTile<T>>();
    if (!A.used) {
      A.used = true;
      A.dB.assign(cv.B.size(), T(0));
      A.dBb.assign(R * C, T(0));
      A.dx.assign(n_src * C, T(0));
      A.trunk.init(cv.tr);
    }
    const int64_t nr = it.r1 - it.r0;
    const T* dout = pg + it.r0 * R;
    double dcoef = 0;  // this item's share of dcoef (summed locally: the threads' accumulators share no line)
    // dZ_i = W'^T dout_i per pair, dz_i = B'^T dout_i
    T* dZ = grow(W.dZ, nr * zs);
    for (const Pair& p : cv.plan->pairs) {
      const int64_t K = p.nh * p.nc;
      T* dg = grow(W.dg, nr * p.nr);
      const int64_t* rows = cv.plan->rows.data() + p.roff;
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < p.nr; ++j) dg[r * p.nr + j] = dout[r * R + rows[j]];
      for (int64_t r = 0; r < nr; ++r) std::fill_n(dZ + r * zs + p.zoff, K, T(0));
      mk_gemm<T>(nr, K, p.nr, dg, p.nr, 1, cv.B.data() + p.boff, K, dZ + p.zoff, zs);
    }
    T* dz = grow(W.dz, nr * C);
    gemm<T>(false, false, nr, C, R, T(1), dout, R, cv.Bb.data(), C, T(0), dz, C);
    // sweep 1: Z and z of the item (for dW' and dB'); one chunk keeps its tile for sweep 2
    std::fill_n(grow(W.Z, nr * zs), nr * zs, T(0));
    std::fill_n(grow(W.z, nr * C), nr * C, T(0));
    // an item of up to kKeepChunks chunks keeps them for sweep 2; a longer one (a hub) recomputes its trunk there
    const int64_t n_chunks = (it.e1 - it.e0 + cv.t - 1) / cv.t;
    const bool keep = n_chunks <= kKeepChunks;
    W.chunks.resize(std::max<int64_t>(W.chunks.size(), keep ? n_chunks : 1));
    for (int64_t k = 0; k < n_chunks; ++k) {
      const int64_t c0 = it.e0 + k * cv.t, c1 = std::min(it.e1, c0 + cv.t);
      Chunk<T>& ch = W.chunks[keep ? k : 0];
      load_chunk<T>(cv, ch, c0, c1, nullptr, 0, &tp);
      accumulate_z(cv, ch, W.Z.data(), W.z.data(), it, c0, c1);
    }
    for (const Pair& p : cv.plan->pairs) {
      const int64_t K = p.nh * p.nc;
      T* dg = grow(W.dg, nr * p.nr);
      const int64_t* rows = cv.plan->rows.data() + p.roff;
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < p.nr; ++j) dg[r * p.nr + j] = dout[r * R + rows[j]];
      mk_gemm<T>(p.nr, K, nr, dg, 1, p.nr, W.Z.data() + p.zoff, zs, A.dB.data() + p.boff, K);
    }
    gemm<T>(true, false, R, C, nr, T(1), dout, R, W.z.data(), C, T(1), A.dBb.data(), C);
    // sweep 2: back through the contraction and the trunk, chunk by chunk
    for (int64_t k = 0; k < n_chunks; ++k) {
      const int64_t c0 = it.e0 + k * cv.t, c1 = std::min(it.e1, c0 + cv.t), t = c1 - c0;
      Chunk<T>& ch = W.chunks[keep ? k : 0];
      if (!keep) load_chunk<T>(cv, ch, c0, c1, nullptr, 0, &tp);
      T* dhs = grow(W.dhs, P * t);
      std::fill_n(dhs, P * t, T(0));
      const auto& perms = cv.plan->perms;
      W.dxq.resize(perms.size());
      for (size_t q = 0; q < perms.size(); ++q) {
        const int64_t n = t * static_cast<int64_t>(perms[q].size());
        std::fill_n(grow(W.dxq[q], n), n, T(0));
      }
      for (const Group& g : cv.plan->groups) {
        const int64_t lq = static_cast<int64_t>(perms[g.q].size());
        for (int64_t r = it.r0; r < it.r1; ++r) {
          const int64_t ea = std::max(cv.rp[r], c0) - c0, eb = std::min(cv.rp[r + 1], c1) - c0;
          if (ea >= eb) continue;
          const int64_t deg = eb - ea;
          // dH_s (deg x nh) += X_q (deg x lq) dZ_g^T (lq x nh)
          const T* dZg = dZ + (r - it.r0) * zs + g.zoff;  // dZ_g^T (lq x nh)
          mk_gemm<T>(deg, g.nh, lq, ch.xq[g.q].data() + ea * lq, lq, 1, dZg, g.nh, dhs + ea * P + g.hoff, P);
          // dX_q^T (lq x deg) += dZ_g^T (lq x nh) H_s^T (nh x deg), all feature-major
          mk_gemm<T>(lq, deg, g.nh, dZg, g.nh, 1, ch.hsf.data() + g.hoff * t + ea, t, W.dxq[g.q].data() + ea, t);
        }
      }
      // per edge: dx_src, ds -> d(d) and dcoef
      T* dxe = grow(W.dxe, C);
      const T* s = ch.s.data();
      for (int64_t r = it.r0; r < it.r1; ++r) {
        const int64_t ea = std::max(cv.rp[r], c0) - c0, eb = std::min(cv.rp[r + 1], c1) - c0;
        const T* dzr = dz + (r - it.r0) * C;
        for (int64_t e = ea; e < eb; ++e) {
          const T* xr = cv.x + cv.src[c0 + e] * C;
          T ds = T(0);
          for (int64_t c = 0; c < C; ++c) {
            dxe[c] = s[e] * dzr[c];
            ds += xr[c] * dzr[c];
          }
          for (size_t q = 0; q < perms.size(); ++q) {
            const int64_t nq = static_cast<int64_t>(perms[q].size());
            const T* dq = W.dxq[q].data() + e;
            for (int64_t j = 0; j < nq; ++j) dxe[perms[q][j]] += dq[j * t];
          }
          for (int64_t i = 0; i < P; ++i) ds += dhs[e * P + i] * ch.hp[e * P + i];
          T* dxs = A.dx.data() + cv.src[c0 + e] * C;
          for (int64_t c = 0; c < C; ++c) dxs[c] += dxe[c];
          // s = norm exp(-coef |d|^2): ds/dd = -2 coef d s, ds/dcoef = -|d|^2 s
          const T g = ds * s[e];
          dcoef -= static_cast<double>(g * ch.d2[e]);
          T* di = pdi + (c0 + e) * cv.n_in;
          const T* row = cv.inp + (c0 + e) * cv.n_in;
          for (int64_t k = 0; k < cv.ndim; ++k) di[k] += minus2coef * g * row[k];
        }
      }
      // d(last activation) = s * dhs in the tile layout, then back through the trunk
      T* dact = grow(W.dact, H * t);
      std::fill_n(dact, H * t, T(0));
      for (int64_t i = 0; i < P; ++i) {
        T* drow = dact + cv.act_row[i] * t;
        for (int64_t e = 0; e < t; ++e) drow[e] = dhs[e * P + i] * s[e];
      }
      const T* d0 = cv.tr.layers.empty() ? dact : trunk_backward(cv.tr, ch.trunk, dact, t, A.trunk);
      for (int64_t i = 0; i < cv.n_in; ++i) {
        const int64_t col = cv.tr.in_perm[i];
        for (int64_t e = 0; e < t; ++e) pdi[(c0 + e) * cv.n_in + col] += d0[i * t + e];
      }
    }
    A.dcoef += dcoef;
  };
  run_items(n_slots, [&](int64_t sl, int64_t) {
    for (int64_t ii = sl * n_items / n_slots; ii < (sl + 1) * n_items / n_slots; ++ii) item_backward(ii, acc[sl]);
  });
  // sum the slots' accumulators in slot order
  ConvGrads<T> tot;
  tot.trunk.init(cv.tr);
  std::vector<T> dB(cv.B.size(), T(0)), dBb(R * C, T(0));
  Tensor dx = zeros_large({n_src, C}, x.options());
  T* pdx = dx.data_ptr<T>();
  double dcoef = 0;
  for (auto& a : acc) {
    if (!a.used) continue;
    for (size_t k = 0; k < a.trunk.dW.size(); ++k) {
      sum_into(tot.trunk.dW[k], a.trunk.dW[k]);
      sum_into(tot.trunk.db[k], a.trunk.db[k]);
      sum_into(tot.trunk.dnb[k], a.trunk.dnb[k]);
      sum_into(tot.trunk.dbnf[k], a.trunk.dbnf[k]);
      sum_into(tot.trunk.dbns[k], a.trunk.dbns[k]);
    }
    for (size_t i = 0; i < dB.size(); ++i) dB[i] += a.dB[i];
    for (int64_t i = 0; i < R * C; ++i) dBb[i] += a.dBb[i];
    for (int64_t i = 0; i < n_src * C; ++i) pdx[i] += a.dx[i];
    dcoef += a.dcoef;
  }
  std::vector<Tensor> out{dx.to(x_.scalar_type()), dinp.to(inp_.scalar_type())};
  trunk_grads_out(cv.tr, tot.trunk, weights, biases, act_bias, bn_factor, bn_shift, out);
  Tensor dfw = zeros_large(final_weight.sizes(), x.options());
  T* pfw = dfw.data_ptr<T>();
  for (size_t i = 0; i < dB.size(); ++i) pfw[cv.plan->widx[i]] = dB[i];
  out.push_back(dfw.to(final_weight.scalar_type()));
  Tensor dfb = at::from_blob(dBb.data(), {R * C}, x.options()).clone().view(final_bias.sizes());
  out.push_back(dfb.to(final_bias.scalar_type()));
  out.push_back(at::full(coef.sizes(), dcoef, x.options()).to(coef.scalar_type()));
  return out;
}

// ----------------------------------------------------------------------------------------------------------------
// trunk_moments
// ----------------------------------------------------------------------------------------------------------------
template <typename T>
std::tuple<Tensor, Tensor, Tensor> trunk_moments_impl(const Tensor& inp_, TensorList weights, TensorList biases,
                                                      TensorList fourier, TensorList fourier_inv, TensorList act_bias,
                                                      TensorList in_factor, TensorList in_shift,
                                                      const std::optional<c10::string_view>& structure,
                                                      int64_t first_layer, bool with_activation, bool with_grid) {
  const auto dt = c10::CppTypeToScalarType<T>::value;
  check_activations(structure, first_layer, static_cast<int64_t>(weights.size()), act_bias, "native", "ik_fast native",
                    /*gated_and_norm=*/true);
  TORCH_CHECK(inp_.dim() == 2, "ik_fast native: inp must be (E, n_in), got shape ", inp_.sizes());
  TORCH_CHECK(inp_.device().is_cpu(), "ik_fast native: the CPU kernels got inp on ", inp_.device());
  check_same_dtype(inp_, Tensor(), weights, biases, in_factor, in_shift, "in_factor", "in_shift", Tensor(), Tensor(),
                   Tensor());
  Tensor inp = inp_.to(dt).contiguous();
  const int64_t E = inp.size(0), n_in = inp.size(1);
  // in_factor[i] is the batch norm on layer i's input: in_factor[0] the trunk's input's, in_factor[k + 1] the one
  // after layer k; the last layer's output has none (its statistics are those before its batch norm)
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(in_factor.size()) == L && static_cast<int64_t>(in_shift.size()) == L,
              "ik_fast native: in_factor and in_shift must have one entry per given layer (", L, "), got ",
              in_factor.size(), " and ", in_shift.size());
  Affines bn;
  bn.factor_name = "in_factor";
  bn.shift_name = "in_shift";
  bn.offset = 1;
  for (int64_t k = 0; k < L; ++k) {
    bn.factor.push_back(k + 1 < L ? in_factor[k + 1] : Tensor());
    bn.shift.push_back(k + 1 < L ? in_shift[k + 1] : Tensor());
  }
  if (L > 0) {
    bn.in_factor = in_factor[0];
    bn.in_shift = in_shift[0];
  }
  const auto st = structure.has_value() ? parse_structure(*structure, "ik_fast native") : nullptr;
  Trunk<T> tr = make_trunk<T>(n_in, weights, biases, fourier, fourier_inv, act_bias, bn, st.get(), first_layer);
  const int64_t H = tr.width();
  const int64_t t = tile_edges(tr.max_rows(), E);
  const int64_t n_tiles = (E + t - 1) / t;
  Tensor act = empty_large({with_activation ? E : 0, H}, inp.options());
  T* pa = with_activation ? act.data_ptr<T>() : nullptr;
  // the last layer's grid (G, C, E): the ELU output its tiles hold anyway (see ops.py, "the tape")
  const bool grid_out = with_grid && !tr.layers.empty() && tr.layers.back().G > 0;
  Tensor grid = grid_out ? empty_large({tr.layers.back().G, tr.layers.back().C, E}, inp.options())
                         : at::empty({0}, inp.options());
  T* pgrid = grid_out ? grid.data_ptr<T>() : nullptr;
  const T* pi = inp.data_ptr<T>();
  std::vector<double> part(n_tiles * 2 * H);  // per tile: mean, sum of squared deviations (tile layout)
  const auto& lp = tr.last_perm();
  run_items(n_tiles, [&](int64_t i, int64_t tid) {
    const int64_t e0 = i * t, n = std::min(E, e0 + t) - e0;
    TrunkTile<T>& S = scratch<TrunkTile<T>>();
    trunk_forward(tr, pi + e0 * n_in, n_in, n, S, pgrid == nullptr ? nullptr : pgrid + e0, E);
    const T* h = S.X.back().data();
    double* mean = part.data() + i * 2 * H;
    double* m2 = mean + H;
    for (int64_t r = 0; r < H; ++r) {
      const T* row = h + r * n;
      const double mu = lane_sum<double>(n, [row](int64_t e) { return static_cast<double>(row[e]); }) / n;
      mean[r] = mu;
      m2[r] = lane_sum<double>(n, [row, mu](int64_t e) {
        const double d = static_cast<double>(row[e]) - mu;
        return d * d;
      });
    }
    if (pa != nullptr)  // row by row of the output (the tile, read across, stays in cache)
      for (int64_t e = 0; e < n; ++e) {
        T* row = pa + (e0 + e) * H;
        for (int64_t r = 0; r < H; ++r) row[lp[r]] = h[r * n + e];
      }
  });
  // merge the tiles in order (Chan et al.): deterministic whatever thread ran which tile
  Tensor mom = at::zeros({2, H}, inp.options());
  T* pm = mom.data_ptr<T>();
  std::vector<double> mean(H, 0.0), m2(H, 0.0);
  double n_a = 0;
  for (int64_t i = 0; i < n_tiles; ++i) {
    const double n_b = static_cast<double>(std::min(E, (i + 1) * t) - i * t), n = n_a + n_b;
    const double* mb = part.data() + i * 2 * H;
    for (int64_t r = 0; r < H; ++r) {
      const double delta = mb[r] - mean[r];
      mean[r] += delta * n_b / n;
      m2[r] += mb[H + r] + delta * delta * n_a * n_b / n;
    }
    n_a = n;
  }
  for (int64_t r = 0; r < H; ++r) {
    pm[lp[r]] = static_cast<T>(mean[r]);
    pm[H + lp[r]] = static_cast<T>(m2[r]);
  }
  return {mom.to(inp_.scalar_type()), act.to(inp_.scalar_type()), grid.to(inp_.scalar_type())};
}

// ----------------------------------------------------------------------------------------------------------------
// dispatch on dtype
// ----------------------------------------------------------------------------------------------------------------
void check_dtype(const Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "ik_fast native: ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

Tensor conv_cpu(const Tensor& x, const Tensor& inp, const Tensor& src, const Tensor& rowptr, TensorList weights,
                TensorList biases, TensorList fourier, TensorList fourier_inv, TensorList act_bias,
                TensorList bn_factor, TensorList bn_shift, const Tensor& final_weight, const Tensor& final_bias,
                const Tensor& coef, double norm, int64_t ndim, const std::optional<c10::string_view>& structure,
                const c10::optional<Tensor>& hidden, c10::optional<TensorList> tape) {
  check_dtype(x, "x");
  if (x.scalar_type() == at::kDouble)
    return conv_impl<double>(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift,
                             final_weight, final_bias, coef, norm, ndim, structure, hidden, tape);
  return conv_impl<float>(x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias, bn_factor, bn_shift,
                          final_weight, final_bias, coef, norm, ndim, structure, hidden, tape);
}

std::vector<Tensor> conv_backward_cpu(const Tensor& grad, const Tensor& x, const Tensor& inp, const Tensor& src,
                                      const Tensor& rowptr, TensorList weights, TensorList biases, TensorList fourier,
                                      TensorList fourier_inv, TensorList act_bias, TensorList bn_factor,
                                      TensorList bn_shift, const Tensor& final_weight, const Tensor& final_bias,
                                      const Tensor& coef, double norm, int64_t ndim,
                                      const std::optional<c10::string_view>& structure,
                                      c10::optional<TensorList> tape) {
  check_dtype(x, "x");
  if (x.scalar_type() == at::kDouble)
    return conv_backward_impl<double>(grad, x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias,
                                      bn_factor, bn_shift, final_weight, final_bias, coef, norm, ndim, structure, tape);
  return conv_backward_impl<float>(grad, x, inp, src, rowptr, weights, biases, fourier, fourier_inv, act_bias,
                                   bn_factor, bn_shift, final_weight, final_bias, coef, norm, ndim, structure, tape);
}

std::tuple<Tensor, Tensor, Tensor> trunk_moments_cpu(const Tensor& inp, TensorList weights, TensorList biases,
                                                     TensorList fourier, TensorList fourier_inv, TensorList act_bias,
                                                     TensorList in_factor, TensorList in_shift,
                                                     const std::optional<c10::string_view>& structure,
                                                     int64_t first_layer, bool with_activation, bool with_grid) {
  check_dtype(inp, "inp");
  if (inp.scalar_type() == at::kDouble)
    return trunk_moments_impl<double>(inp, weights, biases, fourier, fourier_inv, act_bias, in_factor, in_shift,
                                      structure, first_layer, with_activation, with_grid);
  return trunk_moments_impl<float>(inp, weights, biases, fourier, fourier_inv, act_bias, in_factor, in_shift, structure,
                                   first_layer, with_activation, with_grid);
}

}  // namespace

TORCH_LIBRARY_IMPL(ik_fast, CPU, m) {
  m.impl("native_conv", &conv_cpu);
  m.impl("native_conv_backward", &conv_backward_cpu);
  m.impl("native_trunk_moments", &trunk_moments_cpu);
}

}  // namespace cpu
}  // namespace ik_fast
