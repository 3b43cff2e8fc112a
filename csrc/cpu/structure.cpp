// Parsing of the ops' `structure` argument (csrc/structure.h).
#include "../structure.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <sstream>

namespace ik_fast {

std::vector<uint8_t> Structure::mask() const {
  const int64_t Hn = H();
  std::vector<uint8_t> m(static_cast<size_t>(R * Hn * C), 0);
  for (const Block& b : blocks) {
    const FieldGroup& go = out_groups[b.out_group];
    const FieldGroup& gi = in_groups[b.in_group];
    for (int64_t e : b.entries) {
      const int64_t i = e / gi.d, j = e % gi.d;
      for (int64_t fo : go.offsets)
        for (int64_t fi : gi.offsets)
          for (int64_t ch = 0; ch < channels; ++ch) m[((fo + i) * Hn + ch * components + b.component) * C + fi + j] = 1;
    }
  }
  return m;
}

namespace {

struct Reader {
  std::vector<int64_t> v;
  size_t i = 0;
  const char* what;
  int64_t take() {
    TORCH_CHECK_VALUE(i < v.size(), what, ": structure is truncated");
    return v[i++];
  }
  int64_t count() {
    const int64_t n = take();
    TORCH_CHECK_VALUE(n >= 0 && static_cast<size_t>(n) <= v.size() - i, what, ": structure is malformed");
    return n;
  }
};

std::shared_ptr<Structure> parse(const std::string& s, const char* what) {
  std::istringstream in(s);
  std::string magic;
  in >> magic;
  TORCH_CHECK_VALUE(magic == "ik2", what, ": structure must be an encoded ik_fast ConvSpec (starting 'ik2')");
  Reader r;
  r.what = what;
  std::string tok;
  while (in >> tok) {
    char* end = nullptr;
    const long long x = std::strtoll(tok.c_str(), &end, 10);
    TORCH_CHECK_VALUE(end && *end == '\0', what, ": structure holds a non-integer entry");
    r.v.push_back(x);
  }
  auto st = std::make_shared<Structure>();
  st->key = s;
  st->R = r.take();
  st->C = r.take();
  st->channels = r.take();
  st->components = r.take();
  TORCH_CHECK_VALUE(st->R > 0 && st->C > 0 && st->channels > 0 && st->components > 0, what,
                    ": structure sizes must be positive");
  const int64_t L = r.count();
  for (int64_t k = 0; k < L; ++k) {
    HiddenLayout h;
    h.channels = r.take();
    h.components = r.take();
    h.grid = r.take();
    h.componentwise = r.take() != 0;
    h.batch_norm = r.take() != 0;
    h.activation = r.take();
    TORCH_CHECK_VALUE(h.activation >= kElu && h.activation <= kNorm, what, ": structure's hidden layer ", k,
                      " has activation code ", h.activation, ", not one of 0..3");
    const int64_t n = r.count();
    int64_t total = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t size = r.take();
      const int64_t trivial = r.take();
      TORCH_CHECK_VALUE(size > 0 && (trivial == 0 || trivial == 1), what, ": structure's hidden layer ", k,
                        " has an irrep of size ", size, " and trivial flag ", trivial);
      total += size;
      h.irrep_sizes.push_back(size);
      h.irrep_trivial.push_back(static_cast<uint8_t>(trivial));
    }
    if (h.activation == kGated || h.activation == kNorm) {
      TORCH_CHECK_VALUE(n > 0 && total == h.components && h.grid == 0, what, ": structure's ",
                        activation_name(h.activation), " hidden layer ", k,
                        " needs irreps that add up to its components and grid 0");
    } else {
      TORCH_CHECK_VALUE(n == 0 && (h.grid > 0) == (h.activation == kFourierElu), what, ": structure's ",
                        activation_name(h.activation), " hidden layer ", k, " has grid ", h.grid, " and ", n,
                        " irreps");
    }
    TORCH_CHECK_VALUE(st->layers.empty() || st->layers.front().activation == h.activation, what,
                      ": structure's hidden layers mix activation kinds");
    st->layers.push_back(std::move(h));
  }
  for (int side = 0; side < 2; ++side) {
    auto& groups = side == 0 ? st->out_groups : st->in_groups;
    const int64_t size = side == 0 ? st->R : st->C;
    std::vector<int> seen(static_cast<size_t>(size), 0);
    const int64_t n = r.count();
    for (int64_t g = 0; g < n; ++g) {
      FieldGroup fg;
      fg.d = r.take();
      const int64_t F = r.count();
      TORCH_CHECK_VALUE(fg.d > 0 && F > 0, what, ": structure has an empty field group");
      for (int64_t f = 0; f < F; ++f) {
        const int64_t off = r.take();
        TORCH_CHECK_VALUE(off >= 0 && off + fg.d <= size, what, ": structure has a field outside 0..", size - 1);
        for (int64_t j = 0; j < fg.d; ++j) ++seen[off + j];
        fg.offsets.push_back(off);
      }
      groups.push_back(std::move(fg));
    }
    for (int c : seen)
      TORCH_CHECK_VALUE(c == 1, what, ": structure's ", side == 0 ? "output" : "input",
                        " field groups do not cover every index exactly once");
  }
  const int64_t nb = r.count();
  for (int64_t q = 0; q < nb; ++q) {
    Block b;
    b.out_group = r.take();
    b.component = r.take();
    b.in_group = r.take();
    TORCH_CHECK_VALUE(b.out_group >= 0 && b.out_group < static_cast<int64_t>(st->out_groups.size()) &&
                          b.in_group >= 0 && b.in_group < static_cast<int64_t>(st->in_groups.size()) &&
                          b.component >= 0 && b.component < st->components,
                      what, ": structure has a block outside its groups or components");
    const int64_t n = r.count();
    const int64_t size = st->out_groups[b.out_group].d * st->in_groups[b.in_group].d;
    TORCH_CHECK_VALUE(n > 0, what, ": structure has an empty block");
    for (int64_t k = 0; k < n; ++k) {
      const int64_t e = r.take();
      TORCH_CHECK_VALUE(e >= 0 && e < size && (b.entries.empty() || e > b.entries.back()), what,
                        ": structure has a block entry out of order or outside its field pair");
      b.entries.push_back(e);
    }
    st->blocks.push_back(std::move(b));
  }
  TORCH_CHECK_VALUE(r.i == r.v.size(), what, ": structure has trailing entries");
  return st;
}

std::mutex g_mutex;
std::list<std::shared_ptr<const Structure>> g_cache;  // most recent first
constexpr size_t kCacheSize = 32;

}  // namespace

std::shared_ptr<const Structure> parse_structure(c10::string_view s, int64_t R, int64_t H, int64_t C,
                                                 const char* what) {
  std::shared_ptr<const Structure> st = parse_structure(s, what);
  TORCH_CHECK_VALUE(st->R == R && st->H() == H && st->C == C, what, ": structure describes a last Linear of shape (",
                    st->R, ", ", st->H(), ", ", st->C, "), but final_weight is (", R, ", ", H, ", ", C, ")");
  return st;
}

std::shared_ptr<const Structure> parse_structure(c10::string_view s, const char* what) {
  std::shared_ptr<const Structure> st;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (auto it = g_cache.begin(); it != g_cache.end(); ++it)
      if ((*it)->key.size() == s.size() && (*it)->key.compare(0, s.size(), s.data(), s.size()) == 0) {
        g_cache.splice(g_cache.begin(), g_cache, it);
        st = g_cache.front();
        break;
      }
  }
  if (!st) {
    st = parse(std::string(s.data(), s.size()), what);
    std::lock_guard<std::mutex> lock(g_mutex);
    g_cache.push_front(st);
    if (g_cache.size() > kCacheSize) g_cache.pop_back();
  }
  return st;
}

const char* activation_name(int64_t activation) {
  switch (activation) {
    case kElu:
      return "elu";
    case kFourierElu:
      return "fourier_elu";
    case kGated:
      return "gated";
    case kNorm:
      return "norm";
    default:
      return "unknown";
  }
}

void check_activations(const std::optional<c10::string_view>& structure, int64_t first, int64_t L,
                       at::TensorList act_bias, const char* impl, const char* what, bool gated_and_norm) {
  const std::shared_ptr<const Structure> st = structure.has_value() ? parse_structure(*structure, what) : nullptr;
  TORCH_CHECK(static_cast<int64_t>(act_bias.size()) == L, what, ": act_bias must have one entry per hidden layer (", L,
              "), got ", act_bias.size());
  if (st != nullptr) {
    TORCH_CHECK_VALUE(first >= 0 && first + L <= static_cast<int64_t>(st->layers.size()), what, ": structure has ",
                      st->layers.size(), " hidden layers, the program gives ", L, " from layer ", first);
  }
  for (int64_t k = 0; k < L; ++k) {
    const HiddenLayout* h = st != nullptr ? &st->layers[first + k] : nullptr;
    const int64_t kind = h != nullptr ? h->activation : kFourierElu;
    TORCH_CHECK_NOT_IMPLEMENTED(gated_and_norm || (kind != kGated && kind != kNorm), impl, ": nonlinearity '",
                                activation_name(kind), "' is not implemented");
    const int64_t n = kind == kNorm ? h->channels * h->n_nontrivial() : 0;
    const bool fits = act_bias[k].defined() ? (kind == kNorm ? act_bias[k].dim() == 1 && act_bias[k].numel() == n
                                                             : act_bias[k].numel() == 0)
                                            : n == 0;
    if (kind == kNorm) {
      TORCH_CHECK(fits, what, ": act_bias[", k, "] must be (", n,
                  ",) (channels x non-trivial irreps of its norm layer), got shape ",
                  act_bias[k].defined() ? act_bias[k].sizes() : at::IntArrayRef{});
    } else {
      TORCH_CHECK(fits, what, ": act_bias[", k,
                  "] must be empty for a layer whose nonlinearity is not 'norm', got shape ", act_bias[k].sizes());
    }
  }
}

Structure dense_structure(int64_t R, int64_t H, int64_t C) {
  Structure st;
  st.R = R;
  st.C = C;
  st.channels = H;
  st.components = 1;
  if (R > 0) st.out_groups.push_back(FieldGroup{R, {0}});
  if (C > 0) st.in_groups.push_back(FieldGroup{C, {0}});
  if (R > 0 && H > 0 && C > 0) {
    Block b;
    b.entries.resize(static_cast<size_t>(R * C));
    for (int64_t e = 0; e < R * C; ++e) b.entries[e] = e;
    st.blocks.push_back(std::move(b));
  }
  return st;
}

}  // namespace ik_fast
