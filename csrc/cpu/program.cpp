#include "program.h"

#include <algorithm>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <string>

namespace ik_fast {
namespace cpu {

namespace {

template <typename T>
std::vector<T> to_vec(const at::Tensor& t) {
  at::Tensor c = t.to(at::kCPU, c10::CppTypeToScalarType<T>::value).contiguous();
  return std::vector<T>(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
}

// component-major order on `D` components: position a*C + c -> channel-major unit c*D + a
std::vector<int64_t> component_major(int64_t H, int64_t D) {
  std::vector<int64_t> p(H);
  const int64_t C = H / D;
  for (int64_t a = 0; a < D; ++a)
    for (int64_t c = 0; c < C; ++c) p[a * C + c] = c * D + a;
  return p;
}

// a batch norm's affine map on H units (channel-major unit u in channel u / D, D = H / C) per layout row (perm:
// layout position -> unit): its factor, shift and channel; false where there is none (an empty factor)
template <typename T>
bool parse_affine(const at::Tensor& factor, const at::Tensor& shift, const std::vector<int64_t>& perm, int64_t H,
                  const std::string& fname, const std::string& sname, std::vector<T>& f, std::vector<T>& s,
                  std::vector<int64_t>* ch = nullptr, int64_t* n_ch = nullptr) {
  const bool has_f = factor.defined() && factor.numel() > 0, has_s = shift.defined() && shift.numel() > 0;
  TORCH_CHECK(has_f == has_s, "ik_fast native: ", fname, " and ", sname,
              " must both be empty (no batch norm) or both be given, got shapes ",
              factor.defined() ? factor.sizes() : at::IntArrayRef{}, " and ",
              shift.defined() ? shift.sizes() : at::IntArrayRef{});
  if (!has_f) return false;
  TORCH_CHECK(factor.dim() == 1 && H % factor.size(0) == 0, "ik_fast native: ", fname,
              " must be (C,) with C dividing the ", H, " units it scales, got shape ", factor.sizes());
  TORCH_CHECK(shift.numel() == H, "ik_fast native: ", sname, " must have the ", H,
              " entries of the units it shifts, got shape ", shift.sizes());
  const int64_t C = factor.size(0), D = H / C;
  const std::vector<T> fv = to_vec<T>(factor), sv = to_vec<T>(shift);
  f.resize(H);
  s.resize(H);
  if (ch != nullptr) ch->resize(H);
  for (int64_t i = 0; i < H; ++i) {
    f[i] = fv[perm[i] / D];
    s[i] = sv[perm[i]];
    if (ch != nullptr) (*ch)[i] = perm[i] / D;
  }
  if (n_ch != nullptr) *n_ch = C;
  return true;
}

std::string indexed(const char* name, int64_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

}  // namespace

template <typename T>
int64_t Trunk<T>::max_rows() const {
  int64_t m = n_in;
  for (const auto& l : layers) m = std::max({m, l.hout, l.hlin, l.fourier_rows()});
  return m;
}

template <typename T>
Trunk<T> make_trunk(int64_t n_in, at::TensorList weights, at::TensorList biases, at::TensorList fourier,
                    at::TensorList fourier_inv, at::TensorList act_bias, const Affines& bn, const Structure* structure,
                    int64_t first) {
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == L && static_cast<int64_t>(fourier.size()) == L &&
                  static_cast<int64_t>(fourier_inv.size()) == L && static_cast<int64_t>(act_bias.size()) == L,
              "ik_fast native: weights, biases, fourier, fourier_inv and act_bias must have one entry per hidden "
              "layer, got ",
              L, ", ", biases.size(), ", ", fourier.size(), ", ", fourier_inv.size(), ", ", act_bias.size());
  TORCH_CHECK(static_cast<int64_t>(bn.factor.size()) == L && static_cast<int64_t>(bn.shift.size()) == L,
              "ik_fast native: ", bn.factor_name, " and ", bn.shift_name,
              " must have one entry per hidden layer (empty without a batch norm), got ", bn.factor.size() + bn.offset,
              " and ", bn.shift.size() + bn.offset, " for ", L + bn.offset, " layers");
  TORCH_CHECK(structure == nullptr || (first >= 0 && first + L <= static_cast<int64_t>(structure->layers.size())),
              "ik_fast native: structure has no hidden layers ", first, " .. ", first + L - 1);
  Trunk<T> tr;
  tr.n_in = n_in;
  // each layer's layout in the structure (gated and norm: their irreps; nullptr without a structure)
  auto layout = [&](int64_t k) -> const HiddenLayout* {
    return structure != nullptr && first + k >= 0 ? &structure->layers[first + k] : nullptr;
  };
  auto kind = [&](int64_t k) -> int64_t {
    const HiddenLayout* h = layout(k);
    if (h != nullptr && (h->activation == kGated || h->activation == kNorm)) return h->activation;
    return fourier[k].numel() > 0 ? kFourierElu : kElu;
  };
  auto irreps = [&](int64_t k) { return kind(k) == kGated || kind(k) == kNorm; };
  auto gates = [&](int64_t k) { return kind(k) == kGated ? layout(k)->n_nontrivial() : int64_t(0); };
  // the component count of each layer's output layout (1: channel-major order kept)
  std::vector<int64_t> Dl(L + 1, 1);  // Dl[k + 1]: output of layer k; Dl[0]: the input
  auto cw = [&](int64_t k) { return weights[k].dim() == 3; };
  // the input components of a componentwise Linear (a gated layer's gate rows read one of them)
  auto cw_in = [&](int64_t k) { return weights[k].size(0) - gates(k); };
  for (int64_t k = 0; k < L; ++k) {
    const at::Tensor& w = weights[k];
    TORCH_CHECK(w.dim() == 2 || w.dim() == 3, "ik_fast native: weights[", k,
                "] must be (H_out, H_in) or componentwise (D, C_out, C_in), got shape ", w.sizes());
    if (irreps(k)) {
      TORCH_CHECK(fourier[k].numel() == 0 && fourier_inv[k].numel() == 0, "ik_fast native: fourier[", k,
                  "] and fourier_inv[", k, "] must be empty for a ", activation_name(kind(k)), " layer, got ",
                  fourier[k].sizes(), " and ", fourier_inv[k].sizes());
      Dl[k + 1] = layout(k)->components;
    } else if (fourier[k].numel() > 0) {
      TORCH_CHECK(fourier[k].dim() == 2, "ik_fast native: fourier[", k, "] must be (G, D), got ", fourier[k].sizes());
      Dl[k + 1] = fourier[k].size(1);
    } else if (cw(k)) {
      Dl[k + 1] = w.size(0);
    } else if (k + 1 < L && cw(k + 1)) {
      Dl[k + 1] = cw_in(k + 1);
    }
  }
  if (L > 0 && cw(0)) Dl[0] = cw_in(0);
  int64_t hin = n_in;
  TORCH_CHECK(Dl[0] > 0 && hin % Dl[0] == 0, "ik_fast native: weights[0] is componentwise on ", Dl[0],
              " components but the input has ", hin, " columns");
  tr.in_perm = component_major(hin, Dl[0]);
  parse_affine<T>(bn.in_factor, bn.in_shift, tr.in_perm, hin, indexed(bn.factor_name, 0), indexed(bn.shift_name, 0),
                  tr.in_f, tr.in_s);
  for (int64_t k = 0; k < L; ++k) {
    const at::Tensor& w = weights[k];
    Layer<T> l;
    l.kind = kind(k);
    l.cw = cw(k);
    l.hin = hin;
    // the Linear's units per channel (a gated layer's gates after its components) and the activation's
    const int64_t ng = gates(k);
    const int64_t Dout = Dl[k + 1], Dlin = irreps(k) ? Dout + ng : Dout;
    if (l.cw) {
      l.D = w.size(0);
      l.cout = w.size(1);
      l.cin = w.size(2);
      l.hlin = l.D * l.cout;
      const int64_t Din = cw_in(k);
      TORCH_CHECK(Din > 0 && Din * l.cin == hin, "ik_fast native: weights[", k, "] is componentwise ", w.sizes(),
                  " but its input has ", hin, " units");
      TORCH_CHECK(Dl[k] == Din && (irreps(k) ? l.D == Dlin : Dout == l.D), "ik_fast native: weights[", k, "] mixes ",
                  l.D, " components but the layers around it use ", Dl[k], " and ", Dout,
                  " (a layout this implementation does not support)");
      if (ng > 0) {  // the gates read the previous layer's first trivial component (ik_fast.ops.linear_source)
        const HiddenLayout* prev = first + k > 0 ? &structure->layers[first + k - 1] : nullptr;
        int64_t t0 = -1, p = 0;
        for (size_t j = 0; prev != nullptr && j < prev->irrep_sizes.size() && t0 < 0; ++j) {
          if (prev->irrep_trivial[j]) t0 = p;
          p += prev->irrep_sizes[j];
        }
        TORCH_CHECK_VALUE(t0 >= 0 && t0 < Din, "ik_fast native: weights[", k,
                          "] is a componentwise Linear into a gated layer, which needs a trivial irrep in its input "
                          "field");
        for (int64_t a = 0; a < Dout; ++a) l.src.push_back(a);
        for (int64_t g = 0; g < ng; ++g) l.src.push_back(t0);
      }
      l.W = to_vec<T>(w);
    } else {
      l.hlin = w.size(0);
      l.cout = l.hlin;
      l.cin = hin;
      TORCH_CHECK(w.size(1) == hin, "ik_fast native: weights[", k, "] has ", w.size(1), " input columns, expected ",
                  hin);
    }
    TORCH_CHECK(l.hlin % Dlin == 0, "ik_fast native: layer ", k, " has ", l.hlin, " units, not a multiple of its ",
                Dlin, " components", ng > 0 ? " and gates" : "");
    l.hout = l.hlin / Dlin * Dout;
    l.out_perm = component_major(l.hout, Dout);
    l.lin_perm = irreps(k) ? component_major(l.hlin, Dlin) : l.out_perm;
    const auto& in_perm = k == 0 ? tr.in_perm : tr.layers.back().out_perm;
    if (!l.cw) {
      std::vector<T> wd = to_vec<T>(w);
      l.W.resize(l.hlin * hin);
      for (int64_t i = 0; i < l.hlin; ++i)
        for (int64_t j = 0; j < hin; ++j) l.W[i * hin + j] = wd[l.lin_perm[i] * hin + in_perm[j]];
    }
    TORCH_CHECK(biases[k].numel() == l.hlin, "ik_fast native: biases[", k, "] must have ", l.hlin,
                " entries, got shape ", biases[k].sizes());
    std::vector<T> bd = to_vec<T>(biases[k]);
    l.b.resize(l.hlin);
    for (int64_t i = 0; i < l.hlin; ++i) l.b[i] = bd[l.lin_perm[i]];
    if (irreps(k)) {
      const HiddenLayout& h = *layout(k);
      Irreps& ir = l.ir;
      ir.D = Dout;
      ir.C = l.hout / Dout;
      TORCH_CHECK(ir.C == h.channels, "ik_fast native: layer ", k, " has ", ir.C, " channels, its structure ",
                  h.channels);
      int64_t p = 0;
      for (size_t j = 0; j < h.irrep_sizes.size(); ++j) {
        ir.off.push_back(p);
        ir.size.push_back(h.irrep_sizes[j]);
        ir.trivial.push_back(h.irrep_trivial[j]);
        ir.nt_index.push_back(h.irrep_trivial[j] ? -1 : ir.n_nt++);
        p += h.irrep_sizes[j];
      }
      l.C = ir.C;
      if (l.kind == kNorm) {
        TORCH_CHECK(act_bias[k].numel() == ir.C * ir.n_nt, "ik_fast native: act_bias[", k, "] must have ",
                    ir.C * ir.n_nt, " entries (channels x non-trivial irreps), got shape ", act_bias[k].sizes());
        TORCH_CHECK(act_bias[k].scalar_type() == c10::CppTypeToScalarType<T>::value, "ik_fast native: act_bias[", k,
                    "] must have the weights' dtype ", c10::CppTypeToScalarType<T>::value, ", got ",
                    act_bias[k].scalar_type());
        l.nb = to_vec<T>(act_bias[k]);
      }
    } else if (fourier[k].numel() > 0) {
      l.G = fourier[k].size(0);
      l.Df = fourier[k].size(1);
      TORCH_CHECK(fourier_inv[k].dim() == 2 && fourier_inv[k].size(0) == l.Df && fourier_inv[k].size(1) == l.G,
                  "ik_fast native: fourier_inv[", k, "] must be (", l.Df, ", ", l.G, "), got ", fourier_inv[k].sizes());
      TORCH_CHECK(l.hout % l.Df == 0, "ik_fast native: layer ", k, " has ", l.hout, " units, not a multiple of ",
                  "the ", l.Df, " components of fourier[", k, "]");
      l.C = l.hout / l.Df;
      l.A = to_vec<T>(fourier[k]);
      l.Ainv = to_vec<T>(fourier_inv[k]);
    }
    l.bn = parse_affine<T>(bn.factor[k], bn.shift[k], l.out_perm, l.hout, indexed(bn.factor_name, k + bn.offset),
                           indexed(bn.shift_name, k + bn.offset), l.bnf, l.bns, &l.bn_ch, &l.bn_C);
    hin = l.hout;
    tr.layers.push_back(std::move(l));
  }
  return tr;
}

template Trunk<float> make_trunk<float>(int64_t, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                        at::TensorList, const Affines&, const Structure*, int64_t);
template Trunk<double> make_trunk<double>(int64_t, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                          at::TensorList, const Affines&, const Structure*, int64_t);
template int64_t Trunk<float>::max_rows() const;
template int64_t Trunk<double>::max_rows() const;

// ----------------------------------------------------------------------------------------------------------------
// block plan
// ----------------------------------------------------------------------------------------------------------------
namespace {

// a component's couplings: (in_group, out_group) -> the entries it reaches (blocks naming the same triple merged)
using Couplings = std::map<std::pair<int64_t, int64_t>, std::vector<int64_t>>;

std::shared_ptr<Plan> build_plan(const Structure& st) {
  auto plan = std::make_shared<Plan>();
  const int64_t R = st.R, H = st.H(), C = st.C, D = st.components;
  plan->R = R;
  plan->H = H;
  plan->C = C;
  const int64_t HC = H * C;
  std::vector<Couplings> coupling(static_cast<size_t>(D));
  for (const Block& b : st.blocks) {
    std::vector<int64_t>& e = coupling[b.component][{b.in_group, b.out_group}];
    std::vector<int64_t> u;
    std::set_union(e.begin(), e.end(), b.entries.begin(), b.entries.end(), std::back_inserter(u));
    e = std::move(u);
  }
  // hidden groups: components with the same couplings (in order of their first component; components coupled to
  // nothing reach no output); a group's units are every channel of its components, in increasing unit order
  std::map<Couplings, int64_t> class_index;
  std::vector<std::vector<int64_t>> classes;
  for (int64_t a = 0; a < D; ++a) {
    if (coupling[a].empty()) continue;
    auto it = class_index.emplace(coupling[a], static_cast<int64_t>(classes.size())).first;
    if (it->second == static_cast<int64_t>(classes.size())) classes.emplace_back();
    classes[it->second].push_back(a);
  }
  std::map<std::vector<int64_t>, int64_t> perm_index;
  int64_t hoff = 0, zoff = 0, boff = 0;
  for (size_t g = 0; g < classes.size(); ++g) {
    std::vector<int64_t> units;
    for (int64_t ch = 0; ch < st.channels; ++ch)
      for (int64_t a : classes[g]) units.push_back(ch * D + a);
    // column groups: the input classes (in_group, j) (column offset + j of each of its fields) with the same row set
    // {offset of a field of out_group + i : (i, j) an entry of the coupling (in_group, out_group)}, merged
    const Couplings& cp = coupling[classes[g][0]];
    std::map<std::vector<int64_t>, int64_t> col_index;  // row set -> column group
    std::vector<std::vector<int64_t>> cgroups, crows;
    for (auto it = cp.begin(); it != cp.end();) {
      const int64_t ig = it->first.first;
      const FieldGroup& gi = st.in_groups[ig];
      std::vector<std::vector<int64_t>> rows(static_cast<size_t>(gi.d));
      for (; it != cp.end() && it->first.first == ig; ++it) {
        const FieldGroup& go = st.out_groups[it->first.second];
        for (int64_t e : it->second)
          for (int64_t fo : go.offsets) rows[e % gi.d].push_back(fo + e / gi.d);
      }
      for (int64_t j = 0; j < gi.d; ++j) {
        if (rows[j].empty()) continue;
        std::sort(rows[j].begin(), rows[j].end());
        auto cit = col_index.emplace(rows[j], static_cast<int64_t>(cgroups.size())).first;
        if (cit->second == static_cast<int64_t>(cgroups.size())) {
          cgroups.emplace_back();
          crows.push_back(std::move(rows[j]));
        }
        for (int64_t fi : gi.offsets) cgroups[cit->second].push_back(fi + j);
      }
    }
    // columns in increasing order within a column group, column groups in order of their first column
    for (auto& cg : cgroups) std::sort(cg.begin(), cg.end());
    std::vector<size_t> order(cgroups.size());
    for (size_t k = 0; k < order.size(); ++k) order[k] = k;
    std::sort(order.begin(), order.end(), [&](size_t x, size_t y) { return cgroups[x][0] < cgroups[y][0]; });
    std::vector<int64_t> perm;
    for (size_t k : order) perm.insert(perm.end(), cgroups[k].begin(), cgroups[k].end());
    auto pit = perm_index.emplace(perm, static_cast<int64_t>(plan->perms.size())).first;
    const int64_t q = pit->second;
    if (q == static_cast<int64_t>(plan->perms.size())) plan->perms.push_back(std::move(perm));
    const int64_t nh = static_cast<int64_t>(units.size());
    plan->groups.push_back(Group{hoff, nh, q, zoff});
    int64_t coff = 0;
    for (size_t k : order) {
      const std::vector<int64_t>& cg = cgroups[k];
      Pair p;
      p.g = static_cast<int64_t>(g);
      p.hoff = hoff;
      p.nh = nh;
      p.q = q;
      p.coff = coff;
      p.nc = static_cast<int64_t>(cg.size());
      p.roff = static_cast<int64_t>(plan->rows.size());
      p.nr = static_cast<int64_t>(crows[k].size());
      plan->rows.insert(plan->rows.end(), crows[k].begin(), crows[k].end());
      p.zoff = zoff + coff * nh;
      p.boff = boff;
      for (int64_t r : crows[k])
        for (int64_t c : cg)
          for (int64_t h : units) plan->widx.push_back(r * HC + h * C + c);
      boff += p.nr * nh * p.nc;
      coff += p.nc;
      plan->pairs.push_back(p);
    }
    zoff += coff * nh;
    plan->hidden.insert(plan->hidden.end(), units.begin(), units.end());
    hoff += nh;
  }
  plan->zsize = zoff;
  return plan;
}

struct CacheEntry {
  std::string key;  // the structure's encoding ("" for a dense W')
  std::vector<int64_t> sizes;
  std::shared_ptr<const Plan> plan;
};

std::mutex cache_mutex;
std::list<CacheEntry> cache;  // most recent first
constexpr size_t kCacheSize = 16;

}  // namespace

std::shared_ptr<const Plan> plan_for(const std::optional<c10::string_view>& structure, int64_t R, int64_t H,
                                     int64_t C) {
  std::string key = structure.has_value() ? std::string(structure->data(), structure->size()) : std::string();
  std::vector<int64_t> sizes{R, H, C};
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if (it->sizes == sizes && it->key == key) {
        cache.splice(cache.begin(), cache, it);
        return cache.front().plan;
      }
    }
  }
  auto plan = structure.has_value() ? build_plan(*parse_structure(*structure, R, H, C, "ik_fast native"))
                                    : build_plan(dense_structure(R, H, C));
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.push_front(CacheEntry{std::move(key), sizes, plan});
  if (cache.size() > kCacheSize) cache.pop_back();
  return plan;
}

}  // namespace cpu
}  // namespace ik_fast
