// The host side's packing of the fused ops' program (ik_fast/packing.py) on CPU tensors: the passes over the
// expansion's entries that PyTorch would run as a dozen gathers, products and index_adds (on a small graph each
// operator's dispatch costs more than its arithmetic), fused into one loop each;
// a statistics pass's finish with the batch-norm fold it feeds (pack_bn), a hidden fold (pack_fold), and the whole
// backward of the packing's autograd node (pack_vjp), each one call in place of tens of Python-dispatched operators.
// The same sums as the PyTorch form in ik_fast/packing.py and ik_fast/program.py (its fallback off the CPU and the
// statement the tests compare with). Reached from Python through the module's functions (csrc/module.cpp), not ops:
// they are host bookkeeping of one implementation, not stages of the computation.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../ik_fast.h"

namespace ik_fast {
namespace cpu {

namespace {

void check_index(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(
      t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() && t.numel() == n,
      "ik_fast packing: ", name, " must be a contiguous int64 CPU vector of ", n, " entries");
}

// every index in [0, n): one pass before the loops that use them (which then run without a branch per entry); an OR of
// comparisons, which the compiler vectorises (a running min/max of int64 it cannot, without AVX-512)
void check_range(const at::Tensor& idx, int64_t n, const char* name) {
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t m = idx.numel();
  int64_t bad = 0;
  for (int64_t e = 0; e < m; ++e) bad |= static_cast<int64_t>(p[e] < 0) | static_cast<int64_t>(p[e] >= n);
  TORCH_CHECK(bad == 0, "ik_fast packing: ", name, " has an index outside [0, ", n, ")");
}

at::Tensor zeros_here(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  return zero_filled(at::empty(sizes, opt));
}

void check_final(const at::Tensor& t, const at::Tensor& h, const at::Tensor& ch, const at::Tensor& rc, int64_t R,
                 int64_t H, int64_t C, int64_t channels) {
  check_range(t, R * H * C, "t");
  check_range(h, H, "h");
  check_range(ch, channels, "ch");
  check_range(rc, R * C, "rc");
}

// out[i] += v for a sequence of (i, v): the values of consecutive equal i summed in a register, each run added to
// out[i] once (flush() after the last)
template <typename T>
struct RunSum {
  T* out;
  int64_t cur = -1;
  T acc = T(0);
  explicit RunSum(T* o) : out(o) {}
  void add(int64_t i, T v) {
    if (i != cur) {
      flush();
      cur = i;
    }
    acc += v;
  }
  void flush() {
    if (cur >= 0) out[cur] += acc;
    acc = T(0);
  }
};

// a tensor's contiguous numbers of type T, checked to be n of them
template <typename T>
const T* numbers(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == c10::CppTypeToScalarType<T>::value &&
                  t.numel() == n,
              "ik_fast packing: ", name, " must be a contiguous CPU tensor of ", n, " numbers of the packing's dtype");
  return t.data_ptr<T>();
}

// the same, or nullptr for an absent tensor
template <typename T>
const T* ptr_or_null(const OptTensor& t, int64_t n, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  return numbers<T>(*t, n, name);
}

template <typename T>
std::vector<at::Tensor> expand_impl(const at::Tensor& src, const at::Tensor& cols, const at::Tensor& vals,
                                    const at::Tensor& tgt, int64_t size, const at::Tensor& fcols,
                                    const at::Tensor& fvals) {
  const int64_t n = cols.numel(), nf = fcols.numel(), S = src.numel();
  check_index(cols, "cols", n);
  check_index(tgt, "targets", n);
  check_index(fcols, "final cols", nf);
  const T* s = src.data_ptr<T>();
  const T* v = vals.data_ptr<T>();
  const T* fv = fvals.data_ptr<T>();
  const int64_t* c = cols.data_ptr<int64_t>();
  const int64_t* g = tgt.data_ptr<int64_t>();
  const int64_t* fc = fcols.data_ptr<int64_t>();
  at::Tensor flat = zeros_here({size}, src.options());
  at::Tensor contrib = at::empty({nf}, src.options());
  T* o = flat.data_ptr<T>();
  T* w = contrib.data_ptr<T>();
  check_range(cols, S, "cols");
  check_range(tgt, size, "targets");
  check_range(fcols, S, "final cols");
  for (int64_t e = 0; e < n; ++e) o[g[e]] += s[c[e]] * v[e];
  for (int64_t e = 0; e < nf; ++e) w[e] = s[fc[e]] * fv[e];
  return {flat, contrib};
}

template <typename T>
std::vector<at::Tensor> final_impl(const at::Tensor& contrib, const at::Tensor& t, const at::Tensor& h,
                                   const at::Tensor& ch, const at::Tensor& rc, const OptTensor& factor,
                                   const OptTensor& shift, const OptTensor& bias, int64_t R, int64_t H, int64_t C,
                                   int64_t channels) {
  const int64_t nf = contrib.numel();
  for (const auto& [x, name] : {std::pair<const at::Tensor&, const char*>{t, "t"}, {h, "h"}, {ch, "ch"}, {rc, "rc"}})
    check_index(x, name, nf);
  const T* f = ptr_or_null<T>(factor, channels, "factor");
  const T* s = ptr_or_null<T>(shift, H, "shift");
  const T* b = ptr_or_null<T>(bias, R * C, "bias");
  const T* w = contrib.data_ptr<T>();
  const int64_t *pt = t.data_ptr<int64_t>(), *ph = h.data_ptr<int64_t>(), *pc = ch.data_ptr<int64_t>(),
                *pr = rc.data_ptr<int64_t>();
  at::Tensor fw = zeros_here({R, H, C}, contrib.options());
  at::Tensor fb = zeros_here({R, C}, contrib.options());
  T* ow = fw.data_ptr<T>();
  T* ob = fb.data_ptr<T>();
  check_final(t, h, ch, rc, R, H, C, channels);
  if (f) {
    for (int64_t e = 0; e < nf; ++e) ow[pt[e]] += w[e] * f[pc[e]];
  } else {
    for (int64_t e = 0; e < nf; ++e) ow[pt[e]] += w[e];
  }
  if (s)
    for (int64_t e = 0; e < nf; ++e) ob[pr[e]] += w[e] * s[ph[e]];
  if (b)
    for (int64_t i = 0; i < R * C; ++i) ob[i] = s ? b[i] + ob[i] : b[i];
  return {fw, fb};
}

template <typename T>
std::vector<at::Tensor> final_vjp_impl(const OptTensor& gfw, const OptTensor& gfb, const at::Tensor& contrib,
                                       const at::Tensor& t, const at::Tensor& h, const at::Tensor& ch,
                                       const at::Tensor& rc, const OptTensor& factor, const OptTensor& shift, int64_t R,
                                       int64_t H, int64_t C, int64_t channels) {
  const int64_t nf = contrib.numel();
  const T* gw = ptr_or_null<T>(gfw, R * H * C, "gfw");
  const T* gb = ptr_or_null<T>(gfb, R * C, "gfb");
  const T* f = ptr_or_null<T>(factor, channels, "factor");
  const T* s = ptr_or_null<T>(shift, H, "shift");
  const T* w = contrib.data_ptr<T>();
  const int64_t *pt = t.data_ptr<int64_t>(), *ph = h.data_ptr<int64_t>(), *pc = ch.data_ptr<int64_t>(),
                *pr = rc.data_ptr<int64_t>();
  check_final(t, h, ch, rc, R, H, C, channels);
  at::Tensor ge = zeros_here({nf}, contrib.options());
  at::Tensor gf = zeros_here({f && gw ? channels : 0}, contrib.options());
  at::Tensor gs = zeros_here({s && gb ? H : 0}, contrib.options());
  T* oe = ge.data_ptr<T>();
  T* of = gf.data_ptr<T>();
  T* os = gs.data_ptr<T>();
  // the factor's and shift's sums run over channel ch and hidden unit h, which stay the same over long runs of
  // consecutive entries (they are sorted by target, h within r): each run is summed in a register and added once,
  // not through memory entry after entry (a store-to-load chain that was most of this pass)
  RunSum<T> sum_f(of), sum_s(os);
  for (int64_t e = 0; e < nf; ++e) {
    T g = T(0);
    if (gw) {
      const T d = gw[pt[e]];
      g = f ? d * f[pc[e]] : d;
      if (f) sum_f.add(pc[e], d * w[e]);
    }
    if (gb && s) {
      const T d = gb[pr[e]];
      g += d * s[ph[e]];
      sum_s.add(ph[e], d * w[e]);
    }
    oe[e] = g;
  }
  sum_f.flush();
  sum_s.flush();
  return {ge, gf, gs};
}

template <typename T>
at::Tensor transpose_impl(const at::Tensor& flat, const at::Tensor& tgt, const OptTensor& gfinal,
                          const at::Tensor& cols, const at::Tensor& vals, int64_t S) {
  const int64_t n = tgt.numel(), nall = cols.numel(), size = flat.numel();
  check_index(tgt, "targets", n);
  check_index(cols, "cols", nall);
  const T* g = flat.data_ptr<T>();
  const T* gf = ptr_or_null<T>(gfinal, nall - n, "final gradient");
  const T* v = vals.data_ptr<T>();
  const int64_t* pt = tgt.data_ptr<int64_t>();
  const int64_t* pc = cols.data_ptr<int64_t>();
  at::Tensor out = zeros_here({S}, flat.options());
  T* o = out.data_ptr<T>();
  check_range(tgt, size, "targets");
  check_range(cols, S, "cols");
  for (int64_t e = 0; e < n; ++e) o[pc[e]] += g[pt[e]] * v[e];
  if (gf)
    for (int64_t e = n; e < nall; ++e) o[pc[e]] += gf[e - n] * v[e];
  return out;
}

template <typename T>
std::vector<at::Tensor> bn_impl(const at::Tensor& moments, int64_t count, const at::Tensor& avg,
                                const at::Tensor& scale, const at::Tensor& shift, double eps) {
  const int64_t C = scale.numel(), d = avg.size(0);
  TORCH_CHECK(avg.dim() == 2 && avg.size(1) == d && count > 1, "ik_fast packing: avg must be square, count > 1");
  const T* m = numbers<T>(moments, 2 * C * d, "moments");
  const T* a = numbers<T>(avg, d * d, "avg");
  const T* sc = numbers<T>(scale, C, "scale");
  const T* sh = numbers<T>(shift, C * d, "shift");
  const auto opt = moments.options();
  at::Tensor mean = at::empty({C, d}, opt), var = at::empty({C}, opt), factor = at::empty({C}, opt),
             fshift = at::empty({C, d}, opt);
  T *om = mean.data_ptr<T>(), *ov = var.data_ptr<T>(), *of = factor.data_ptr<T>(), *os = fshift.data_ptr<T>();
  const T* m2 = m + C * d;
  const T denom = T(count - 1);
  for (int64_t c = 0; c < C; ++c) {
    // mean = m0 avg^T (the projection onto the field's trivial irreps); var = the unbiased per-component variance,
    // averaged over the field; then BatchNorm.factors
    T v = T(0);
    for (int64_t j = 0; j < d; ++j) {
      T acc = T(0);
      for (int64_t i = 0; i < d; ++i) acc += m[c * d + i] * a[j * d + i];
      om[c * d + j] = acc;
      v += m2[c * d + j] / denom;
    }
    ov[c] = v / T(d);
    of[c] = sc[c] / std::sqrt(ov[c] + T(eps));
    for (int64_t j = 0; j < d; ++j) os[c * d + j] = sh[c * d + j] - om[c * d + j] * of[c];
  }
  return {mean, var, factor, fshift};
}

// the batch norm before a hidden Linear folded into it: componentwise (D, C_out, C_in) or dense (R, C_in * d)
template <typename T>
std::vector<at::Tensor> fold_impl(const at::Tensor& W, const OptTensor& bias, const at::Tensor& factor,
                                  const at::Tensor& shift, bool componentwise) {
  const int64_t Ci = factor.numel();
  at::Tensor w = at::empty_like(W);
  T* ow = w.data_ptr<T>();
  const T* f = numbers<T>(factor, Ci, "factor");
  if (componentwise) {
    TORCH_CHECK(W.dim() == 3 && W.size(2) == Ci, "ik_fast packing: componentwise weight must be (D, C_out, C_in)");
    const int64_t D = W.size(0), Co = W.size(1);
    const T* pw = numbers<T>(W, D * Co * Ci, "weight");
    const T* s = numbers<T>(shift, Ci * D, "shift");
    const T* b = ptr_or_null<T>(bias, Co * D, "bias");
    at::Tensor out_b = at::empty({Co * D}, W.options());
    T* ob = out_b.data_ptr<T>();
    for (int64_t a = 0; a < D; ++a)
      for (int64_t co = 0; co < Co; ++co) {
        const T* row = pw + (a * Co + co) * Ci;
        T acc = T(0);
        for (int64_t ci = 0; ci < Ci; ++ci) {
          ow[(a * Co + co) * Ci + ci] = row[ci] * f[ci];
          acc += row[ci] * s[ci * D + a];
        }
        ob[co * D + a] = b ? b[co * D + a] + acc : acc;
      }
    return {w, out_b};
  }
  TORCH_CHECK(W.dim() == 2 && W.size(1) % Ci == 0, "ik_fast packing: dense weight must be (R, C_in * d)");
  const int64_t R = W.size(0), Q = W.size(1), d = Q / Ci;
  const T* pw = numbers<T>(W, R * Q, "weight");
  const T* s = numbers<T>(shift, Q, "shift");
  const T* b = ptr_or_null<T>(bias, R, "bias");
  at::Tensor out_b = at::empty({R}, W.options());
  T* ob = out_b.data_ptr<T>();
  for (int64_t r = 0; r < R; ++r) {
    T acc = T(0);
    for (int64_t q = 0; q < Q; ++q) {
      ow[r * Q + q] = pw[r * Q + q] * f[q / d];
      acc += pw[r * Q + q] * s[q];
    }
    ob[r] = b ? b[r] + acc : acc;
  }
  return {w, out_b};
}

// _FromSources.backward (ik_fast/packing.py) in one pass: the folds' vector-Jacobian products layer by layer into the
// small pieces' flat gradient, the final fold's per entry, the batch norms' scales and shifts, sigma, then the
// expansion's transpose
template <typename T>
std::vector<at::Tensor> vjp_impl(const std::vector<OptTensor>& grads, const std::vector<at::Tensor>& weights,
                                 const std::vector<int64_t>& componentwise, const std::vector<OptTensor>& factors,
                                 const std::vector<OptTensor>& shifts, const std::vector<OptTensor>& means,
                                 const std::vector<OptTensor>& vars, const std::vector<double>& eps,
                                 const std::vector<int64_t>& bn_layers, const std::vector<int64_t>& off_w,
                                 const std::vector<int64_t>& off_b, const std::vector<int64_t>& off_shift,
                                 int64_t flat_size, const at::Tensor& contrib, const at::Tensor& t, const at::Tensor& h,
                                 const at::Tensor& ch, const at::Tensor& rc, int64_t R, int64_t H, int64_t C,
                                 int64_t channels, const at::Tensor& tgt, const at::Tensor& cols,
                                 const at::Tensor& vals, int64_t S, const at::Tensor& coef, const at::Tensor& sigma) {
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == 2 * L + 3 && componentwise.size() == weights.size() &&
                  static_cast<int64_t>(factors.size()) == L && shifts.size() == factors.size() &&
                  means.size() == factors.size() && vars.size() == factors.size() && eps.size() == factors.size() &&
                  off_w.size() == factors.size() && static_cast<int64_t>(off_b.size()) == L + 1 &&
                  off_shift.size() == factors.size(),
              "ik_fast packing: vjp lists must have one entry per hidden layer (grads: 2 L + 3, off_b: L + 1)");
  const auto opt = contrib.options();
  at::Tensor gflat = zeros_here({flat_size}, opt);
  T* g = gflat.data_ptr<T>();
  auto piece = [&](int64_t off, int64_t n, const char* name) -> T* {
    if (off < 0) return nullptr;
    TORCH_CHECK(off + n <= flat_size, "ik_fast packing: piece ", name, " outside the flat gradient");
    return g + off;
  };
  auto grad = [&](int64_t i) -> at::Tensor {
    const auto& x = grads[i];
    return x.has_value() && x->defined() ? x->contiguous() : at::Tensor();
  };
  // the gradients of each batch norm's (factor, shift), filled by the Linear after it
  std::vector<at::Tensor> gfac(L), gsh(L);
  for (int64_t k = 0; k < L; ++k) {
    const at::Tensor gw = grad(k), gb = grad(L + k);
    const at::Tensor& W = weights[k];
    const int64_t R_k = gb.defined() ? gb.numel() : -1;
    if (gb.defined()) {
      if (T* pb = piece(off_b[k], gb.numel(), "bias")) {
        const T* x = gb.data_ptr<T>();
        for (int64_t i = 0; i < gb.numel(); ++i) pb[i] += x[i];
      }
    }
    const bool pend = k > 0 && factors[k - 1].has_value() && factors[k - 1]->defined();
    const T* f = pend ? numbers<T>(*factors[k - 1], factors[k - 1]->numel(), "factor") : nullptr;
    const int64_t Ci = pend ? factors[k - 1]->numel() : 0;
    T* pw = piece(off_w[k], W.numel(), "weight");
    const T* w = W.data_ptr<T>();
    TORCH_CHECK(W.is_contiguous() && W.scalar_type() == contrib.scalar_type(),
                "ik_fast packing: weights must be contiguous in the packing's dtype");
    if (gw.defined()) TORCH_CHECK(gw.numel() == W.numel(), "ik_fast packing: a weight's gradient has its shape");
    if (componentwise[k]) {
      const int64_t D = W.size(0), Co = W.size(1), Cw = W.size(2);
      TORCH_CHECK(!pend || Cw == Ci, "ik_fast packing: factor must match the componentwise weight");
      const T* s = pend ? numbers<T>(*shifts[k - 1], Ci * D, "shift") : nullptr;
      if (pend && gw.defined()) gfac[k - 1] = zeros_here({Ci}, opt);
      if (pend && gb.defined()) {
        TORCH_CHECK(R_k == Co * D, "ik_fast packing: bias gradient must have C_out * D numbers");
        gsh[k - 1] = zeros_here({Ci, D}, opt);
      }
      const T* x = gw.defined() ? gw.data_ptr<T>() : nullptr;
      const T* xb = gb.defined() && pend ? gb.data_ptr<T>() : nullptr;
      T* of = pend && x ? gfac[k - 1].data_ptr<T>() : nullptr;
      T* os = xb ? gsh[k - 1].data_ptr<T>() : nullptr;
      for (int64_t a = 0; a < D; ++a)
        for (int64_t co = 0; co < Co; ++co)
          for (int64_t ci = 0; ci < Cw; ++ci) {
            const int64_t i = (a * Co + co) * Cw + ci;
            T v = T(0);
            if (x) {
              v = f ? x[i] * f[ci] : x[i];
              if (of) of[ci] += x[i] * w[i];
            }
            if (xb) {
              const T gbv = xb[co * D + a];
              v = x ? v + gbv * s[ci * D + a] : gbv * s[ci * D + a];
              os[ci * D + a] += w[i] * gbv;
            }
            if (pw && (x || xb)) pw[i] += v;
          }
    } else {
      const int64_t Rw = W.size(0), Q = W.numel() / Rw;
      const int64_t d = pend ? Q / Ci : 1;
      TORCH_CHECK(!pend || Q == Ci * d, "ik_fast packing: factor must divide the dense weight's columns");
      const T* s = pend ? numbers<T>(*shifts[k - 1], Q, "shift") : nullptr;
      const T* x = gw.defined() ? gw.data_ptr<T>() : nullptr;
      const T* xb = gb.defined() && pend ? gb.data_ptr<T>() : nullptr;
      if (xb) TORCH_CHECK(R_k == Rw, "ik_fast packing: bias gradient must have one number per row");
      if (pend && x) gfac[k - 1] = zeros_here({Ci}, opt);
      if (xb) gsh[k - 1] = zeros_here({Q}, opt);
      T* of = pend && x ? gfac[k - 1].data_ptr<T>() : nullptr;
      T* os = xb ? gsh[k - 1].data_ptr<T>() : nullptr;
      for (int64_t r = 0; r < Rw; ++r)
        for (int64_t q = 0; q < Q; ++q) {
          const int64_t i = r * Q + q;
          T v = T(0);
          if (x) {
            v = f ? x[i] * f[q / d] : x[i];
            if (of) of[q / d] += x[i] * w[i];
          }
          if (xb) {
            v = x ? v + xb[r] * s[q] : xb[r] * s[q];
            os[q] += w[i] * xb[r];
          }
          if (pw && (x || xb)) pw[i] += v;
        }
    }
  }
  // the last Linear: its bias, then its entries (final_vjp)
  const at::Tensor gfw = grad(2 * L), gfb = grad(2 * L + 1), gcoef = grad(2 * L + 2);
  if (gfb.defined()) {
    if (T* pb = piece(off_b[L], gfb.numel(), "final bias")) {
      const T* x = gfb.data_ptr<T>();
      for (int64_t i = 0; i < gfb.numel(); ++i) pb[i] += x[i];
    }
  }
  const bool pend_last = L > 0 && factors[L - 1].has_value() && factors[L - 1]->defined();
  OptTensor lf, ls;
  if (pend_last) {
    lf = factors[L - 1]->contiguous();
    ls = shifts[L - 1]->contiguous();
  }
  auto fin =
      final_vjp_impl<T>(gfw.defined() ? OptTensor(gfw) : OptTensor(), gfb.defined() ? OptTensor(gfb) : OptTensor(),
                        contrib, t, h, ch, rc, lf, ls, R, H, C, channels);
  const bool final_used = gfw.defined() || (gfb.defined() && pend_last);
  if (pend_last) {
    if (fin[1].numel()) gfac[L - 1] = fin[1];
    if (fin[2].numel()) gsh[L - 1] = fin[2];
  }
  // the batch norms: shift_bn gets ds; scale gets (df - sum_a ds mean) / sqrt(var + eps)
  std::vector<at::Tensor> out;
  out.reserve(2 + bn_layers.size());
  out.push_back(at::Tensor());  // the sources' gradient, below
  out.push_back(at::Tensor());  // sigma's
  for (int64_t k : bn_layers) {
    TORCH_CHECK(k >= 0 && k < L, "ik_fast packing: bn layer index out of range");
    const bool pend = factors[k].has_value() && factors[k]->defined();
    at::Tensor gf = pend ? gfac[k] : at::Tensor(), gs = pend ? gsh[k] : at::Tensor();
    if (gs.defined()) {
      const int64_t n = gs.numel(), Cb = factors[k]->numel(), d = n / Cb;
      const T* x = gs.data_ptr<T>();
      const T* mean = numbers<T>(*means[k], n, "mean");
      if (T* ps = piece(off_shift[k], n, "shift")) {
        for (int64_t i = 0; i < n; ++i) ps[i] += x[i];
      }
      at::Tensor extra = at::empty({Cb}, opt);
      T* e = extra.data_ptr<T>();
      for (int64_t c = 0; c < Cb; ++c) {
        T acc = T(0);
        for (int64_t j = 0; j < d; ++j) acc += x[c * d + j] * mean[c * d + j];
        e[c] = -acc;
      }
      if (gf.defined()) {
        T* pf = gf.data_ptr<T>();
        for (int64_t c = 0; c < Cb; ++c) pf[c] += e[c];
      } else {
        gf = extra;
      }
    }
    if (gf.defined()) {
      const T* v = numbers<T>(*vars[k], gf.numel(), "var");
      T* pf = gf.data_ptr<T>();
      for (int64_t c = 0; c < gf.numel(); ++c) pf[c] = pf[c] / std::sqrt(v[c] + T(eps[k]));
    }
    out.push_back(gf);
  }
  if (gcoef.defined()) {  // coef = 1 / (2 sigma^2)
    const T* gc = gcoef.data_ptr<T>();
    const T* c = numbers<T>(coef, gcoef.numel(), "coef");
    T acc = T(0);
    for (int64_t i = 0; i < gcoef.numel(); ++i) acc += gc[i] * c[i] * c[i];
    out[1] = sigma.mul(-acc * T(4));
  }
  out[0] = transpose_impl<T>(gflat, tgt, final_used ? OptTensor(fin[0]) : OptTensor(), cols, vals, S);
  return out;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(
      t.device().is_cpu() && t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
      "ik_fast packing: ", name, " must be a contiguous float32 or float64 CPU tensor");
}

// the learnable tensors the expansion reads, concatenated flat in their order (its columns index that)
at::Tensor flat_sources(const std::vector<at::Tensor>& sources) {
  TORCH_CHECK(!sources.empty(), "ik_fast packing: no sources");
  std::vector<at::Tensor> flat;
  flat.reserve(sources.size());
  for (const auto& t : sources) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == sources[0].scalar_type(),
                "ik_fast packing: sources must be CPU tensors of one dtype");
    flat.push_back(t.reshape({-1}));
  }
  at::Tensor src = flat.size() == 1 ? flat[0].contiguous() : at::cat(flat);
  check_float(src, "sources");
  return src;
}

// a flat gradient split into tensors of the given shapes (views)
std::vector<at::Tensor> split_shaped(const at::Tensor& flat, const std::vector<std::vector<int64_t>>& shapes) {
  std::vector<at::Tensor> out;
  out.reserve(shapes.size());
  int64_t off = 0;
  for (const auto& shape : shapes) {
    const int64_t n = c10::multiply_integers(shape);
    out.push_back(flat.narrow(0, off, n).view(shape));
    off += n;
  }
  return out;
}

int64_t total_numel(const std::vector<std::vector<int64_t>>& shapes) {
  int64_t S = 0;
  for (const auto& shape : shapes) S += c10::multiply_integers(shape);
  return S;
}

}  // namespace

std::vector<at::Tensor> pack_expand(const std::vector<at::Tensor>& sources, const at::Tensor& cols,
                                    const at::Tensor& vals, const at::Tensor& tgt, int64_t size,
                                    const at::Tensor& fcols, const at::Tensor& fvals,
                                    const std::vector<std::vector<int64_t>>& shapes,
                                    const std::vector<int64_t>& offsets) {
  const at::Tensor src = flat_sources(sources);
  TORCH_CHECK(vals.scalar_type() == src.scalar_type() && fvals.scalar_type() == src.scalar_type() &&
                  vals.is_contiguous() && fvals.is_contiguous() && vals.numel() == cols.numel() &&
                  fvals.numel() == fcols.numel(),
              "ik_fast packing: values must match the entries and src's dtype");
  TORCH_CHECK(shapes.size() == offsets.size(), "ik_fast packing: one offset per piece shape");
  std::vector<at::Tensor> res = src.scalar_type() == at::kDouble
                                    ? expand_impl<double>(src, cols, vals, tgt, size, fcols, fvals)
                                    : expand_impl<float>(src, cols, vals, tgt, size, fcols, fvals);
  // the small pieces as views of the flat expansion, then the final weight's entry products
  std::vector<at::Tensor> out;
  out.reserve(shapes.size() + 1);
  for (size_t i = 0; i < shapes.size(); ++i) {
    const int64_t n = c10::multiply_integers(shapes[i]);
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + n <= size, "ik_fast packing: piece ", i, " outside the expansion");
    out.push_back(res[0].narrow(0, offsets[i], n).view(shapes[i]));
  }
  out.push_back(res[1]);
  return out;
}

std::vector<at::Tensor> pack_final(const at::Tensor& contrib, const at::Tensor& t, const at::Tensor& h,
                                   const at::Tensor& ch, const at::Tensor& rc, const OptTensor& factor,
                                   const OptTensor& shift, const OptTensor& bias, int64_t R, int64_t H, int64_t C,
                                   int64_t channels) {
  check_float(contrib, "contrib");
  if (contrib.scalar_type() == at::kDouble)
    return final_impl<double>(contrib, t, h, ch, rc, factor, shift, bias, R, H, C, channels);
  return final_impl<float>(contrib, t, h, ch, rc, factor, shift, bias, R, H, C, channels);
}

std::vector<at::Tensor> pack_bn(const at::Tensor& moments, int64_t count, const at::Tensor& avg,
                                const at::Tensor& scale, const at::Tensor& shift, double eps) {
  check_float(moments, "moments");
  if (moments.scalar_type() == at::kDouble) return bn_impl<double>(moments, count, avg, scale, shift, eps);
  return bn_impl<float>(moments, count, avg, scale, shift, eps);
}

std::vector<at::Tensor> pack_fold(const at::Tensor& W, const OptTensor& bias, const at::Tensor& factor,
                                  const at::Tensor& shift, bool componentwise) {
  check_float(W, "weight");
  if (W.scalar_type() == at::kDouble) return fold_impl<double>(W, bias, factor, shift, componentwise);
  return fold_impl<float>(W, bias, factor, shift, componentwise);
}

std::vector<at::Tensor> pack_vjp(const std::vector<OptTensor>& grads, const std::vector<at::Tensor>& weights,
                                 const std::vector<int64_t>& componentwise, const std::vector<OptTensor>& factors,
                                 const std::vector<OptTensor>& shifts, const std::vector<OptTensor>& means,
                                 const std::vector<OptTensor>& vars, const std::vector<double>& eps,
                                 const std::vector<int64_t>& bn_layers, const std::vector<int64_t>& off_w,
                                 const std::vector<int64_t>& off_b, const std::vector<int64_t>& off_shift,
                                 int64_t flat_size, const at::Tensor& contrib, const at::Tensor& t, const at::Tensor& h,
                                 const at::Tensor& ch, const at::Tensor& rc, int64_t R, int64_t H, int64_t C,
                                 int64_t channels, const at::Tensor& tgt, const at::Tensor& cols,
                                 const at::Tensor& vals, const std::vector<std::vector<int64_t>>& shapes,
                                 const at::Tensor& coef, const at::Tensor& sigma) {
  check_float(contrib, "contrib");
  const int64_t nf = contrib.numel();
  for (const auto& [x, name] : {std::pair<const at::Tensor&, const char*>{t, "t"}, {h, "h"}, {ch, "ch"}, {rc, "rc"}})
    check_index(x, name, nf);
  TORCH_CHECK(vals.scalar_type() == contrib.scalar_type() && vals.is_contiguous() && vals.numel() == cols.numel() &&
                  cols.numel() >= tgt.numel(),
              "ik_fast packing: values must match the entries and the packing's dtype");
  const int64_t S = total_numel(shapes);
  std::vector<at::Tensor> res = contrib.scalar_type() == at::kDouble
                                    ? vjp_impl<double>(grads, weights, componentwise, factors, shifts, means, vars, eps,
                                                       bn_layers, off_w, off_b, off_shift, flat_size, contrib, t, h, ch,
                                                       rc, R, H, C, channels, tgt, cols, vals, S, coef, sigma)
                                    : vjp_impl<float>(grads, weights, componentwise, factors, shifts, means, vars, eps,
                                                      bn_layers, off_w, off_b, off_shift, flat_size, contrib, t, h, ch,
                                                      rc, R, H, C, channels, tgt, cols, vals, S, coef, sigma);
  // each source's gradient (a view of the flat one), then sigma's, then each batch norm's scale's
  std::vector<at::Tensor> out = split_shaped(res[0], shapes);
  out.insert(out.end(), res.begin() + 1, res.end());
  return out;
}

}  // namespace cpu
}  // namespace ik_fast
