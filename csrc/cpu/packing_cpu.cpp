// The host side's packing of the fused ops' program (ik_fast/packing.py) on CPU tensors: the passes over the
// expansion's entries that PyTorch would run as a dozen gathers, products and index_adds (each a few tens of
// microseconds on a 400-edge graph, where the whole training step is a few milliseconds), fused into one loop each.
// Same sums in the same entry order as the PyTorch form in ik_fast/packing.py (its fallback off the CPU and the
// statement the tests compare with). Reached from Python through the module's functions (csrc/module.cpp), not ops:
// they are host bookkeeping of one implementation, not stages of the computation.
#include <ATen/ATen.h>

#include <algorithm>
#include <vector>

#include "../ik_fast.h"

namespace ik_fast {
namespace cpu {

namespace {

void check_index(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous() &&
                  t.numel() == n,
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

template <typename T>
const T* ptr_or_null(const OptTensor& t, int64_t n, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->is_contiguous() && t->numel() == n, "ik_fast packing: ", name, " must be contiguous with ", n,
              " numbers");
  return t->data_ptr<T>();
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
                                       const at::Tensor& rc, const OptTensor& factor, const OptTensor& shift,
                                       int64_t R, int64_t H, int64_t C, int64_t channels) {
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

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() &&
                  (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
              "ik_fast packing: ", name, " must be a contiguous float32 or float64 CPU tensor");
}

}  // namespace

std::vector<at::Tensor> pack_expand(const at::Tensor& src, const at::Tensor& cols, const at::Tensor& vals,
                                    const at::Tensor& tgt, int64_t size, const at::Tensor& fcols,
                                    const at::Tensor& fvals) {
  check_float(src, "src");
  TORCH_CHECK(vals.scalar_type() == src.scalar_type() && fvals.scalar_type() == src.scalar_type() &&
                  vals.is_contiguous() && fvals.is_contiguous() && vals.numel() == cols.numel() &&
                  fvals.numel() == fcols.numel(),
              "ik_fast packing: values must match the entries and src's dtype");
  if (src.scalar_type() == at::kDouble) return expand_impl<double>(src, cols, vals, tgt, size, fcols, fvals);
  return expand_impl<float>(src, cols, vals, tgt, size, fcols, fvals);
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

std::vector<at::Tensor> pack_final_vjp(const OptTensor& gfw, const OptTensor& gfb, const at::Tensor& contrib,
                                       const at::Tensor& t, const at::Tensor& h, const at::Tensor& ch,
                                       const at::Tensor& rc, const OptTensor& factor, const OptTensor& shift,
                                       int64_t R, int64_t H, int64_t C, int64_t channels) {
  check_float(contrib, "contrib");
  const int64_t nf = contrib.numel();
  for (const auto& [x, name] : {std::pair<const at::Tensor&, const char*>{t, "t"}, {h, "h"}, {ch, "ch"}, {rc, "rc"}})
    check_index(x, name, nf);
  if (contrib.scalar_type() == at::kDouble)
    return final_vjp_impl<double>(gfw, gfb, contrib, t, h, ch, rc, factor, shift, R, H, C, channels);
  return final_vjp_impl<float>(gfw, gfb, contrib, t, h, ch, rc, factor, shift, R, H, C, channels);
}

at::Tensor pack_transpose(const at::Tensor& flat, const at::Tensor& tgt, const OptTensor& gfinal,
                          const at::Tensor& cols, const at::Tensor& vals, int64_t S) {
  check_float(flat, "flat");
  TORCH_CHECK(vals.scalar_type() == flat.scalar_type() && vals.is_contiguous() && vals.numel() == cols.numel() &&
                  cols.numel() >= tgt.numel(),
              "ik_fast packing: values must match the entries and the gradient's dtype");
  if (flat.scalar_type() == at::kDouble) return transpose_impl<double>(flat, tgt, gfinal, cols, vals, S);
  return transpose_impl<float>(flat, tgt, gfinal, cols, vals, S);
}

}  // namespace cpu
}  // namespace ik_fast
