// The trunk of the kernel MLP on CUDA: the fused forward per tile of edges, the Fourier ELU's backward per tile, and
// the host code around them (layer preparation, the backward's Linear gradients through ATen / cuBLAS, and
// ik_fast::native_trunk_moments). The algorithm and memory per stage are described in conv_cuda.cu's header.
//
// Kernels:
//   ik_trunk_forward_kernel<T>        one block per tile of `be` edges; every layer of (up to kMaxLayers of) the MLP
//                                     on chip: two (be, ld) shared-memory tiles X (activation) and Y
//                                     (pre-activation) and a Fourier scratch U (su elements). Per layer:
//                                       Linear X -> Y   dense: one block GEMM (be x hin) . W^T (hin x lout)
//                                                       componentwise: D block GEMMs (be x cin) . W_a^T batched
//                                                       over the component a, on the channel-major tile (a gated
//                                                       layer's gate rows read the previous field's first trivial
//                                                       component through the A operand's offsets)
//                                       act    Y -> X   Fourier ELU: the tile viewed as (be * C, fd) rows (one per
//                                                       edge and channel); per chunk of rows and of gc grid points
//                                                       U = elu(Y_rows A^T[:, chunk]) (in U, never in global memory),
//                                                       X_rows += U (A^+)^T[chunk, :]; pointwise ELU elementwise;
//                                                       gated / norm elementwise from Y (irrep_act, common.cuh: a
//                                                       channel's gates after its D components in Y; a norm irrep's
//                                                       |v| from its few components in Y, per element)
//                                       affine X -> X   the batch norm's map with known statistics, in the tile
//                                                       (X[e, c D + i] = X[e, c D + i] factor[c] + shift[c D + i]),
//                                                       fused with the save of a and, for the elementwise kinds,
//                                                       with it.
//                                     An affine map on the input (trunk_moments from a previous pass's activation)
//                                     is applied as the input tile is loaded.
//                                     Writes h (E, H_L) after the last layer's affine, and, for the backward, each
//                                     layer's y and a (a before its affine).
//   ik_fourier_elu_backward_kernel<T> one block per tile: dY of a Fourier ELU from the saved Y and dA, per chunk of
//                                     rows and grid points: U = Y A^T, P = (dA A^+) * elu'(U) (in U), dY += P A.
//                                     dA = dH * factor (the affine's backward) is formed as the tile is loaded.
//   ik_elu_backward_kernel<T>         pointwise ELU's backward, elementwise (dA = dH * factor likewise).
//   ik_irrep_act_backward_kernel<T>   gated / norm backward, one thread per unit of the Linear's output (a gate's and
//                                     a norm irrep's thread sums over the irrep's few components); a norm layer's
//                                     act_bias terms per edge (E, C nnt), summed over the edges with ATen.
#include "common.cuh"
#include "gemm_cuda.h"
#include "trunk_cuda.h"

#include "../structure.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <utility>

namespace ik_fast_cuda {

// ------------------------------------------------------------------------------------------------------------------
// device stages (the caller synchronises between them)
// ------------------------------------------------------------------------------------------------------------------

// Y = X W^T + b on the tile (rows 0 .. be-1, row stride ld; lout columns).
template <int TC, typename T>
__device__ __forceinline__ void linear_tile(const LayerDesc<T>& L, const T* X, T* Y, int be, int ld) {
  const T* __restrict__ w = L.w;
  const T* __restrict__ b = L.b;
  const int hin = L.hin;
  const int lout = L.lout;
  if (L.cw_d == 0) {
    mm<TC, 4, 4>(
        1, be, lout, hin, X, [=](int, int m) { return m * ld; }, 1, w, [=](int, int n) { return n; }, lout,
        [=](int, int m, int n, T v) { Y[m * ld + n] = v + b[n]; });
  } else {
    // y[e, co D + a] = sum_ci W[a, co, ci] x[e, ci Din + src(a)], src(a) = a for a < dm, else t0 (a gated layer's
    // gates read the previous field's first trivial component): batch a, rows e, columns co, reduction ci
    const int D = L.cw_d;
    const int Din = L.cw_din;
    const int dm = L.cw_dm;
    const int t0 = L.cw_t0;
    const int cin = hin / Din;
    const int cout = lout / D;
    mm<TC, 4, 4>(
        D, be, cout, cin, X, [=](int a, int m) { return m * ld + (a < dm ? a : t0); }, Din, w,
        [=](int a, int n) { return a * cin * cout + n; }, cout,
        [=](int a, int m, int n, T v) { Y[m * ld + n * D + a] = v + b[n * D + a]; });
  }
}

// X = FourierELU(Y) per channel of fd components: X_c = elu(Y_c A^T) (A^+)^T, through the scratch U.
template <int TC, typename T>
__device__ __forceinline__ void fourier_elu_tile(const LayerDesc<T>& L, const T* Y, T* X, T* U, int be, int ld, int gc,
                                                 int su) {
  const T* __restrict__ at = L.at;
  const T* __restrict__ ainvt = L.ainvt;
  const int fd = L.fd;
  const int G = L.g;
  const int C = L.hout / fd;
  const int M = be * C;
  const int mr = su / gc;  // rows per chunk (>= 1: the host sizes su >= gc)
  for (int m0 = 0; m0 < M; m0 += mr) {
    const int mc = min(mr, M - m0);
    for (int g0 = 0; g0 < G; g0 += gc) {
      const int gcc = min(gc, G - g0);
      // U (mc x gcc) = elu(Y_rows (mc x fd) . A^T[:, g0 .. g0 + gcc])
      mm<TC, 4, 4>(
          1, mc, gcc, fd, Y,
          [=](int, int m) {
            const int r = m0 + m;
            return (r / C) * ld + (r % C) * fd;
          },
          1, at, [=](int, int n) { return g0 + n; }, G, [=](int, int m, int n, T v) { U[m * gc + n] = elu(v); });
      __syncthreads();
      // X_rows (mc x fd) (+)= U (mc x gcc) . (A^+)^T[g0 .. g0 + gcc, :]
      mm<TC, 4, 4>(
          1, mc, fd, gcc, U, [=](int, int m) { return m * gc; }, 1, ainvt, [=](int, int n) { return g0 * fd + n; }, fd,
          [=](int, int m, int n, T v) {
            const int r = m0 + m;
            T* p = X + (r / C) * ld + (r % C) * fd + n;
            *p = (g0 == 0 ? T(0) : *p) + v;
          });
      __syncthreads();
    }
  }
}

// rows 0 .. ne-1 of a shared-memory tile -> global (E, width) rows e0 ..
template <typename T>
__device__ __forceinline__ void store_rows(const T* S, int ld, T* out, int64_t e0, int ne, int width) {
  for (int idx = threadIdx.x; idx < ne * width; idx += blockDim.x) {
    const int e = idx / width;
    const int j = idx - e * width;
    out[(e0 + e) * width + j] = S[e * ld + j];
  }
}

// global (E, width) rows e0 .. e0 + ne - 1 -> rows 0 .. ne - 1 of a shared-memory tile (rows ne .. be - 1 zero), each
// value v mapped to v f[j / d] + s[j] on the way when f is not null (v f[j / d] when s is null)
template <typename T>
__device__ __forceinline__ void load_rows(T* S, int ld, const T* __restrict__ in, int64_t e0, int ne, int be, int width,
                                          const T* __restrict__ f = nullptr, const T* __restrict__ s = nullptr,
                                          int d = 1) {
  for (int idx = threadIdx.x; idx < be * width; idx += blockDim.x) {
    const int e = idx / width;
    const int j = idx - e * width;
    T v = T(0);
    if (e < ne) {
      v = in[(e0 + e) * width + j];
      if (f != nullptr) v = s != nullptr ? fma(v, f[j / d], s[j]) : v * f[j / d];
    }
    S[e * ld + j] = v;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------------------------------
template <typename T, int TC>
__global__ void __launch_bounds__(kTrunkThreads) ik_trunk_forward_kernel(const __grid_constant__ TrunkArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* X = reinterpret_cast<T*>(smem_raw);
  T* Y = X + a.be * a.ld;
  T* U = Y + a.be * a.ld;
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * a.be;
  const int ne = static_cast<int>(min(static_cast<int64_t>(a.be), a.E - e0));
  // padding rows are zeros (computed on, never stored)
  load_rows(X, a.ld, a.in, e0, ne, a.be, a.hin0, a.in_f, a.in_s, a.in_d);
  __syncthreads();
  int width = a.hin0;
  for (int k = 0; k < a.nl; ++k) {
    const LayerDesc<T>& L = a.layer[k];
    linear_tile<TC>(L, X, Y, a.be, a.ld);
    __syncthreads();
    if (L.save_y != nullptr) store_rows(Y, a.ld, L.save_y, e0, ne, L.lout);
    width = L.hout;
    const bool fourier = L.act == kActFourierElu;
    if (fourier) fourier_elu_tile<TC>(L, Y, X, U, a.be, a.ld, a.gc, a.su);  // ends with a barrier
    // the activation a (pointwise ELU, gated, norm: formed here from Y; Fourier ELU: in X), its save, then the affine
    // map in place. Each element of X is read and written by one thread (the same one that wrote it above for the
    // Fourier ELU; the other kinds read only Y)
    if (!fourier || L.save_a != nullptr || L.bnf != nullptr) {
      const T* __restrict__ f = L.bnf;
      const T* __restrict__ sh = L.bns;
      for (int idx = threadIdx.x; idx < a.be * width; idx += blockDim.x) {
        const int e = idx / width;
        const int j = idx - e * width;
        const int p = e * a.ld + j;
        T v;
        if (fourier)
          v = X[p];
        else if (L.act == kActElu)
          v = elu(Y[p]);
        else
          v = irrep_act(L.act, L.tab, L.ab, L.id, L.dl, L.nnt, Y + e * a.ld, j);
        if (L.save_a != nullptr && e < ne) L.save_a[(e0 + e) * width + j] = v;
        X[p] = f != nullptr ? fma(v, f[j / L.bnd], sh[j]) : v;
      }
      __syncthreads();  // X complete before the next layer's Linear (or the final store) reads it
    }
  }
  store_rows(X, a.ld, a.out, e0, ne, width);
  if (a.part != nullptr) {  // (X is complete: the last layer ended with a barrier) one thread per column
    T* ps = a.part + static_cast<int64_t>(blockIdx.x) * 2 * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x) {
      T sum = T(0);
      for (int e = 0; e < ne; ++e) sum += X[e * a.ld + j];
      const T mean = sum / static_cast<T>(ne);
      T m2 = T(0);
      for (int e = 0; e < ne; ++e) {
        const T d = X[e * a.ld + j] - mean;
        m2 = fma(d, d, m2);
      }
      ps[j] = sum;
      ps[width + j] = m2;
    }
  }
}

// dy (E, H) of a Fourier ELU of fd-component channels given its input y and the gradient dh of the layer's output:
// the activation's gradient is da = dh bnf[j / bnd] when the layer has an affine map (bnf not null), else dh.
template <typename T, int TC>
__global__ void __launch_bounds__(kTrunkThreads)
    ik_fourier_elu_backward_kernel(const T* __restrict__ y, const T* __restrict__ dh, T* __restrict__ dy,
                                   const T* __restrict__ at, const T* __restrict__ ainv, const T* __restrict__ A,
                                   const T* __restrict__ bnf, int bnd, int64_t E, int H, int fd, int G, int be, int ld,
                                   int gc, int su) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Yt = reinterpret_cast<T*>(smem_raw);
  T* dAt = Yt + be * ld;
  T* dYt = dAt + be * ld;
  T* U = dYt + be * ld;
  const int64_t e0 = static_cast<int64_t>(blockIdx.x) * be;
  const int ne = static_cast<int>(min(static_cast<int64_t>(be), E - e0));
  load_rows(Yt, ld, y, e0, ne, be, H);
  load_rows(dAt, ld, dh, e0, ne, be, H, bnf, static_cast<const T*>(nullptr), bnd);  // dA = dH factor (or dH)
  __syncthreads();
  const int C = H / fd;
  const int M = be * C;
  const int mr = su / gc;
  for (int m0 = 0; m0 < M; m0 += mr) {
    const int mc = min(mr, M - m0);
    auto row = [=](int, int m) {
      const int r = m0 + m;
      return (r / C) * ld + (r % C) * fd;
    };
    for (int g0 = 0; g0 < G; g0 += gc) {
      const int gcc = min(gc, G - g0);
      // U = Y_rows A^T[:, chunk]   (the grid values u)
      mm<TC, 4, 4>(
          1, mc, gcc, fd, Yt, row, 1, at, [=](int, int n) { return g0 + n; }, G,
          [=](int, int m, int n, T v) { U[m * gc + n] = v; });
      __syncthreads();
      // U = (dA_rows A^+[:, chunk]) * elu'(u)   (d u; each entry read and written by its owner)
      mm<TC, 4, 4>(
          1, mc, gcc, fd, dAt, row, 1, ainv, [=](int, int n) { return g0 + n; }, G,
          [=](int, int m, int n, T v) { U[m * gc + n] = v * elu_grad(U[m * gc + n]); });
      __syncthreads();
      // dY_rows (+)= U A[chunk, :]
      mm<TC, 4, 4>(
          1, mc, fd, gcc, U, [=](int, int m) { return m * gc; }, 1, A, [=](int, int n) { return g0 * fd + n; }, fd,
          [=](int, int m, int n, T v) {
            const int r = m0 + m;
            T* p = dYt + (r / C) * ld + (r % C) * fd + n;
            *p = (g0 == 0 ? T(0) : *p) + v;
          });
      __syncthreads();
    }
  }
  store_rows(dYt, ld, dy, e0, ne, H);
}

// dy (E, H) of a pointwise ELU given its input y and the gradient dh of the layer's output (da = dh bnf[j / bnd] with
// an affine map, as above).
template <typename T>
__global__ void __launch_bounds__(256)
    ik_elu_backward_kernel(const T* __restrict__ y, const T* __restrict__ dh, T* __restrict__ dy,
                           const T* __restrict__ bnf, int bnd, int H, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T da = dh[i];
    if (bnf != nullptr) da *= bnf[static_cast<int>(i % H) / bnd];
    dy[i] = da * elu_grad(y[i]);
  }
}

// dy (E, C dl) of a gated or norm layer (tab, ab, D, dl, nnt as in LayerDesc) given its input y (E, C dl) and the
// gradient dh (E, C D) of the layer's output (da = dh bnf[j / bnd] with an affine map, as above), one thread per
// element of dy; for norm also dab (E, C nnt), each edge's term of act_bias's gradient (written by the thread of the
// irrep's first component; the host sums it over the edges). With s = sigmoid of the gate or of |v| - b:
//   trivial component:        dy_a = da_a elu'(y_a)
//   gated, component a of g:  dy_a = da_a s;     gate g: dy = (sum_{a in g} da_a y_a) s (1 - s)
//   norm, component a of g:   dy_a = da_a s + (sum_{b in g} da_b y_b) s (1 - s) y_a / |v|   (0 where |v| = 0)
//                             dab[e, c nnt + g] = -(sum_{b in g} da_b y_b) s (1 - s)
template <typename T>
__global__ void __launch_bounds__(256)
    ik_irrep_act_backward_kernel(const T* __restrict__ y, const T* __restrict__ dh, T* __restrict__ dy,
                                 T* __restrict__ dab, const int* __restrict__ tab, const T* __restrict__ ab,
                                 const T* __restrict__ bnf, int bnd, int act, int C, int D, int dl, int nnt,
                                 int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i / (C * dl);
    const int r = static_cast<int>(i - e * (C * dl));
    const int c = r / dl;
    const int u = r - c * dl;
    const T* yc = y + e * (C * dl) + c * dl;
    const T* dc = dh + e * (C * D) + c * D;
    // da at component a of this channel
    auto da = [&](int a) { return bnf != nullptr ? dc[a] * bnf[(c * D + a) / bnd] : dc[a]; };
    const int g = u < D ? tab[u] : u - D;
    if (g < 0) {
      dy[i] = da(u) * elu_grad(yc[u]);
      continue;
    }
    const int s0 = tab[D + 2 * g];
    const int sz = tab[D + 2 * g + 1];
    if (act == kActGated && u < D) {
      dy[i] = da(u) * sigmoid(yc[D + g]);
      continue;
    }
    T dot = T(0);
    T sq = T(0);
    for (int k = 0; k < sz; ++k) {
      const T v = yc[s0 + k];
      dot = fma(da(s0 + k), v, dot);
      sq = fma(v, v, sq);
    }
    if (act == kActGated) {  // the gate
      const T sg = sigmoid(yc[u]);
      dy[i] = dot * sg * (T(1) - sg);
      continue;
    }
    const T nrm = sq > T(0) ? sqrt(sq) : T(0);
    const T sg = sigmoid(nrm - ab[c * nnt + g]);
    const T sp = dot * sg * (T(1) - sg);
    dy[i] = da(u) * sg + (nrm > T(0) ? sp * yc[u] / nrm : T(0));
    if (u == s0) dab[e * (C * nnt) + c * nnt + g] = -sp;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// host
// ------------------------------------------------------------------------------------------------------------------
namespace {

constexpr int kGridChunk = 32;  // grid points of the Fourier ELU per chunk (gc)
constexpr int kMaxScratchRows = 256;  // rows (edge, channel) of the Fourier scratch per chunk

int odd(int64_t n) {
  return static_cast<int>(n | 1);
}

// Edges per tile: the largest power of two <= 16 with which two blocks fit in a multiprocessor's shared memory (so that
// the wide trunks, e.g. H = 816, still run two or more blocks of 8 warps per SM), but no fewer than 4 edges for that;
// below 4 edges, the largest tile that fits at all.
template <typename F>
int pick_tile(F bytes_for, const char* what) {
  const size_t limit = max_smem_optin();
  const size_t half = limit / 2 > 1024 ? limit / 2 - 1024 : limit / 2;  // (the runtime reserves 1 KB per block)
  int be = 16;
  while (be > 4 && bytes_for(be) > half) be /= 2;
  while (be > 1 && bytes_for(be) > limit) be /= 2;
  TORCH_CHECK(bytes_for(be) <= limit, "ik_fast native CUDA: the ", what, " needs ", bytes_for(be),
              " bytes of shared memory for one edge, more than the device's ", limit,
              " (hidden layers too wide for this implementation)");
  return be;
}

template <typename T, int TC>
void launch_trunk_group(const at::Tensor& in, const Affine& in_map, at::Tensor& out,
                        const std::vector<TrunkLayer>& layers, size_t k0, size_t k1, std::vector<at::Tensor>* ys,
                        std::vector<at::Tensor>* as, at::Tensor* part, int* part_be) {
  TrunkArgs<T> a{};
  const int64_t E = in.size(0);
  int64_t hmax = in.size(1);
  int64_t rows = 1;  // (edge, channel) rows per edge of the widest Fourier layer
  for (size_t k = k0; k < k1; ++k) {
    const TrunkLayer& t = layers[k];
    LayerDesc<T>& L = a.layer[k - k0];
    L.w = t.wk.data_ptr<T>();
    L.b = t.b.data_ptr<T>();
    L.at = t.fd > 0 ? t.At.data_ptr<T>() : nullptr;
    L.ainvt = t.fd > 0 ? t.Ainvt.data_ptr<T>() : nullptr;
    L.tab = t.tab.defined() ? t.tab.data_ptr<int>() : nullptr;
    L.ab = t.ab.defined() ? t.ab.data_ptr<T>() : nullptr;
    L.bnf = t.bn.on() ? t.bn.f.data_ptr<T>() : nullptr;
    L.bns = t.bn.on() ? t.bn.s.data_ptr<T>() : nullptr;
    L.bnd = t.bn.on() ? static_cast<int>(t.bn.d) : 1;
    L.save_y = ys != nullptr ? (*ys)[k].data_ptr<T>() : nullptr;
    // (the last layer's activation is the output itself when no affine map follows it)
    L.save_a = (as != nullptr && (k + 1 < layers.size() || t.bn.on())) ? (*as)[k].data_ptr<T>() : nullptr;
    L.act = t.act;
    L.hin = static_cast<int>(t.hin);
    L.lout = static_cast<int>(t.lout);
    L.hout = static_cast<int>(t.hout);
    L.cw_d = static_cast<int>(t.cw_d);
    L.cw_din = static_cast<int>(t.cw_din);
    L.cw_dm = static_cast<int>(t.cw_dm);
    L.cw_t0 = static_cast<int>(t.cw_t0);
    L.fd = static_cast<int>(t.fd);
    L.g = static_cast<int>(t.g);
    L.id = static_cast<int>(t.id);
    L.dl = static_cast<int>(t.dl);
    L.nnt = static_cast<int>(t.nnt);
    hmax = std::max({hmax, t.lout, t.hout});
    if (t.fd > 0) rows = std::max(rows, t.hout / t.fd);
  }
  a.in = in.data_ptr<T>();
  a.in_f = in_map.on() ? in_map.f.data_ptr<T>() : nullptr;
  a.in_s = in_map.on() ? in_map.s.data_ptr<T>() : nullptr;
  a.in_d = in_map.on() ? static_cast<int>(in_map.d) : 1;
  a.out = out.data_ptr<T>();
  a.E = E;
  a.nl = static_cast<int>(k1 - k0);
  a.hin0 = static_cast<int>(in.size(1));
  a.ld = odd(hmax);
  a.gc = kGridChunk;
  auto su_for = [&](int be) { return kGridChunk * static_cast<int>(std::min<int64_t>(be * rows, kMaxScratchRows)); };
  auto bytes = [&](int be) { return (2 * static_cast<size_t>(be) * a.ld + su_for(be)) * sizeof(T); };
  a.be = pick_tile(bytes, "trunk forward");
  a.su = su_for(a.be);
  const size_t smem = bytes(a.be);
  allow_smem(ik_trunk_forward_kernel<T, TC>, smem);
  const int64_t blocks = ceil_div(E, a.be);
  if (part != nullptr) {
    *part = at::empty({blocks, 2, layers[k1 - 1].hout}, in.options());
    *part_be = a.be;
    a.part = part->data_ptr<T>();
  }
  ik_trunk_forward_kernel<T, TC><<<static_cast<unsigned>(blocks), kTrunkThreads, smem, current_stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dy (E, L_k) of layer t's activation from its saved input y and dh, the gradient of the layer's output (after its
// affine map); a norm layer's per-edge act_bias terms into dab (E, C nnt)
template <typename T, int TC>
void launch_act_backward(const TrunkLayer& t, const at::Tensor& y, const at::Tensor& dh, at::Tensor& dy,
                         at::Tensor& dab) {
  const int64_t E = y.size(0);
  const int64_t H = t.hout;
  const T* bnf = t.bn.on() ? t.bn.f.data_ptr<T>() : nullptr;
  const int bnd = t.bn.on() ? static_cast<int>(t.bn.d) : 1;
  auto stream = current_stream();
  if (t.act == kActGated || t.act == kActNorm) {
    const int64_t n = E * t.lout;
    const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 65535 * 8);
    ik_irrep_act_backward_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        y.data_ptr<T>(), dh.data_ptr<T>(), dy.data_ptr<T>(), dab.defined() ? dab.data_ptr<T>() : nullptr,
        t.tab.data_ptr<int>(), t.ab.defined() ? t.ab.data_ptr<T>() : nullptr, bnf, bnd, t.act,
        static_cast<int>(t.hout / t.id), static_cast<int>(t.id), static_cast<int>(t.dl), static_cast<int>(t.nnt), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (t.fd == 0) {
    const int64_t n = E * H;
    const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 65535 * 8);
    ik_elu_backward_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        y.data_ptr<T>(), dh.data_ptr<T>(), dy.data_ptr<T>(), bnf, bnd, static_cast<int>(H), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int ld = odd(H);
  const int64_t rows = H / t.fd;
  auto su_for = [&](int be) { return kGridChunk * static_cast<int>(std::min<int64_t>(be * rows, kMaxScratchRows)); };
  auto bytes = [&](int be) { return (3 * static_cast<size_t>(be) * ld + su_for(be)) * sizeof(T); };
  const int be = pick_tile(bytes, "Fourier ELU backward");
  const size_t smem = bytes(be);
  allow_smem(ik_fourier_elu_backward_kernel<T, TC>, smem);
  ik_fourier_elu_backward_kernel<T, TC><<<static_cast<unsigned>(ceil_div(E, be)), kTrunkThreads, smem, stream>>>(
      y.data_ptr<T>(), dh.data_ptr<T>(), dy.data_ptr<T>(), t.At.data_ptr<T>(), t.Ainv.data_ptr<T>(), t.A.data_ptr<T>(),
      bnf, bnd, E, static_cast<int>(H), static_cast<int>(t.fd), static_cast<int>(t.g), be, ld, kGridChunk, su_for(be));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

namespace {

std::mutex g_table_mutex;
std::vector<std::pair<std::pair<std::vector<int32_t>, at::Device>, at::Tensor>> g_tables;

// A gated / norm layout's LayerDesc::tab on the device: per component of a channel's field its non-trivial irrep's
// number (-1: trivial), then per non-trivial irrep (first component, size). A structural constant: uploaded once per
// content and device (a few entries), not per call.
at::Tensor irrep_table(const ik_fast::HiddenLayout& h, const at::Device& dev) {
  std::vector<int32_t> tab, irr;
  int32_t p = 0, g = 0;
  for (size_t j = 0; j < h.irrep_sizes.size(); ++j) {
    const int32_t size = static_cast<int32_t>(h.irrep_sizes[j]);
    const bool trivial = h.irrep_trivial[j] != 0;
    for (int32_t i = 0; i < size; ++i) tab.push_back(trivial ? -1 : g);
    if (!trivial) {
      irr.push_back(p);
      irr.push_back(size);
      ++g;
    }
    p += size;
  }
  tab.insert(tab.end(), irr.begin(), irr.end());
  std::lock_guard<std::mutex> lock(g_table_mutex);
  for (const auto& e : g_tables)
    if (e.first.second == dev && e.first.first == tab) return e.second;
  at::Tensor cpu = at::empty({static_cast<int64_t>(tab.size())}, at::TensorOptions().dtype(at::kInt));
  std::memcpy(cpu.data_ptr(), tab.data(), tab.size() * sizeof(int32_t));
  at::Tensor t = cpu.to(dev);
  if (g_tables.size() >= 32) g_tables.erase(g_tables.begin());
  g_tables.push_back({{std::move(tab), dev}, t});
  return t;
}

// the first trivial component of a channel's field (-1: none)
int64_t trivial_source(const ik_fast::HiddenLayout& h) {
  int64_t p = 0;
  for (size_t j = 0; j < h.irrep_sizes.size(); ++j) {
    if (h.irrep_trivial[j] != 0) return p;
    p += h.irrep_sizes[j];
  }
  return -1;
}

}  // namespace

static_assert(kActElu == ik_fast::kElu && kActFourierElu == ik_fast::kFourierElu && kActGated == ik_fast::kGated &&
                  kActNorm == ik_fast::kNorm,
              "the kernels' activation codes are the structure's");

std::vector<TrunkLayer> prepare_trunk(at::TensorList weights, at::TensorList biases, at::TensorList fourier,
                                      at::TensorList fourier_inv, at::TensorList act_bias,
                                      const std::optional<c10::string_view>& structure, int64_t first, int64_t p0,
                                      at::ScalarType st, const at::Device& dev, int64_t* h_last) {
  const size_t L = weights.size();
  TORCH_CHECK(biases.size() == L && fourier.size() == L && fourier_inv.size() == L && act_bias.size() == L,
              "ik_fast native CUDA: weights, biases, fourier, fourier_inv and act_bias must have one entry per hidden "
              "layer, got ",
              L, ", ", biases.size(), ", ", fourier.size(), ", ", fourier_inv.size(), ", ", act_bias.size());
  // the layers' kinds: the structure's (never the data's)
  const std::shared_ptr<const ik_fast::Structure> sp =
      structure.has_value() ? ik_fast::parse_structure(*structure, "ik_fast native CUDA") : nullptr;
  if (sp != nullptr) {
    TORCH_CHECK_VALUE(first >= 0 && first + static_cast<int64_t>(L) <= static_cast<int64_t>(sp->layers.size()),
                      "ik_fast native CUDA: structure has ", sp->layers.size(), " hidden layers, the program gives ", L,
                      " from layer ", first);
  }
  std::vector<TrunkLayer> out;
  out.reserve(L);
  int64_t hin = p0;
  for (size_t k = 0; k < L; ++k) {
    const std::string wn = "weights[" + std::to_string(k) + "]";
    const std::string bn = "biases[" + std::to_string(k) + "]";
    const std::string fn = "fourier[" + std::to_string(k) + "]";
    const std::string in = "fourier_inv[" + std::to_string(k) + "]";
    const std::string an = "act_bias[" + std::to_string(k) + "]";
    const ik_fast::HiddenLayout* lay = sp != nullptr ? &sp->layers[first + k] : nullptr;
    const ik_fast::HiddenLayout* prev =
        sp != nullptr && first + static_cast<int64_t>(k) > 0 ? &sp->layers[first + k - 1] : nullptr;
    check_cuda(weights[k], wn.c_str(), dev);
    check_cuda(biases[k], bn.c_str(), dev);
    check_float(weights[k], wn.c_str());
    check_float(biases[k], bn.c_str());
    TrunkLayer t;
    t.act = lay != nullptr ? static_cast<int>(lay->activation) : (fourier[k].numel() > 0 ? kActFourierElu : kActElu);
    const bool irreps = t.act == kActGated || t.act == kActNorm;
    TORCH_CHECK(t.act == kActNorm || !act_bias[k].defined() || act_bias[k].numel() == 0, "ik_fast native CUDA: ", an,
                " must be empty for a layer whose nonlinearity is not 'norm', got shape ", act_bias[k].sizes());
    if (irreps) {
      t.id = lay->components;
      t.nnt = lay->n_nontrivial();
      t.dl = lay->linear_components();
    }
    t.w = prep(weights[k], st);
    t.hin = hin;
    if (t.w.dim() == 2) {
      TORCH_CHECK(t.w.size(1) == hin, "ik_fast native CUDA: ", wn, " has shape ", t.w.sizes(), ", expected (L_", k + 1,
                  ", ", hin, ")");
      t.lout = t.w.size(0);
      t.wk = t.w.t().contiguous();
    } else {
      TORCH_CHECK(t.w.dim() == 3, "ik_fast native CUDA: ", wn, " must be 2-D (dense) or 3-D (componentwise), got ",
                  t.w.sizes());
      t.cw_d = t.w.size(0);
      const int64_t cin = t.w.size(2);
      // a gated layer's gates read the previous field's first trivial component (ops.linear_source); the other
      // outputs (every output of the other kinds) their own component
      const bool gates = t.act == kActGated && t.nnt > 0 && prev != nullptr;
      if (gates) {
        t.cw_t0 = trivial_source(*prev);
        TORCH_CHECK(t.cw_t0 >= 0, "ik_fast native CUDA: a componentwise Linear into a gated layer (", wn,
                    ") needs a trivial irrep in its input field");
        t.cw_din = cin > 0 && hin % cin == 0 ? hin / cin : 0;
        t.cw_dm = t.id;
        TORCH_CHECK(t.cw_d == t.dl && cin > 0 && t.cw_din * cin == hin && t.cw_din > t.cw_t0 && t.cw_din >= t.id,
                    "ik_fast native CUDA: componentwise ", wn, " has shape ", t.w.sizes(), ", expected (", t.dl,
                    ", C, C_in) on the ", hin, " units of the layer before (C_in channels of ", prev->components,
                    " components)");
      } else {
        t.cw_din = t.cw_d;
        t.cw_dm = t.cw_d;
        TORCH_CHECK(t.cw_d > 0 && cin * t.cw_d == hin, "ik_fast native CUDA: componentwise ", wn, " has shape ",
                    t.w.sizes(), ", which does not act on the ", hin, " units of the layer before (D * C_in)");
      }
      t.lout = t.w.size(0) * t.w.size(1);
      t.wk = t.w.transpose(1, 2).contiguous();
    }
    TORCH_CHECK(t.lout > 0, "ik_fast native CUDA: ", wn, " has no output units");
    TORCH_CHECK(biases[k].dim() == 1 && biases[k].size(0) == t.lout, "ik_fast native CUDA: ", bn, " has shape ",
                biases[k].sizes(), ", expected (", t.lout, ",)");
    t.b = prep(biases[k], st);
    t.hout = t.lout;
    if (irreps) {
      TORCH_CHECK(t.lout % t.dl == 0, "ik_fast native CUDA: ", wn, " has ", t.lout,
                  " output units, not whole channels of ", t.dl, " (the ", lay->components,
                  " components of the layer's field", t.act == kActGated ? " and its gates" : "", ")");
      const int64_t C = t.lout / t.dl;
      t.hout = C * t.id;
      t.tab = irrep_table(*lay, dev);
      if (t.act == kActNorm) {
        TORCH_CHECK(act_bias[k].defined() && act_bias[k].dim() == 1 && act_bias[k].size(0) == C * t.nnt,
                    "ik_fast native CUDA: ", an, " has shape ",
                    act_bias[k].defined() ? act_bias[k].sizes() : at::IntArrayRef{}, ", expected (", C * t.nnt,
                    ",) for the norm layer's ", C, " channels of ", t.nnt, " non-trivial irreps");
        if (C * t.nnt > 0) {
          check_cuda(act_bias[k], an.c_str(), dev);
          check_float(act_bias[k], an.c_str());
          t.ab = prep(act_bias[k], st);
        }
      }
    } else if (t.act == kActFourierElu) {
      TORCH_CHECK(fourier[k].numel() > 0, "ik_fast native CUDA: ", fn,
                  " is empty, but the structure states a Fourier ELU layer");
      check_cuda(fourier[k], fn.c_str(), dev);
      check_cuda(fourier_inv[k], in.c_str(), dev);
      check_float(fourier[k], fn.c_str());
      check_float(fourier_inv[k], in.c_str());
      TORCH_CHECK(fourier[k].dim() == 2, "ik_fast native CUDA: ", fn, " must be (G, D), got ", fourier[k].sizes());
      t.g = fourier[k].size(0);
      t.fd = fourier[k].size(1);
      TORCH_CHECK(t.g > 0 && t.fd > 0 && t.hout % t.fd == 0, "ik_fast native CUDA: ", fn, " has shape ",
                  fourier[k].sizes(), ": the layer's ", t.hout, " units are not whole channels of D components");
      TORCH_CHECK(fourier_inv[k].dim() == 2 && fourier_inv[k].size(0) == t.fd && fourier_inv[k].size(1) == t.g,
                  "ik_fast native CUDA: ", in, " has shape ", fourier_inv[k].sizes(), ", expected (", t.fd, ", ", t.g,
                  ")");
      t.A = prep(fourier[k], st);
      t.Ainv = prep(fourier_inv[k], st);
      t.At = t.A.t().contiguous();
      t.Ainvt = t.Ainv.t().contiguous();
    }
    hin = t.hout;
    out.push_back(std::move(t));
  }
  *h_last = hin;
  return out;
}

Affine prepare_affine(const at::Tensor& factor, const at::Tensor& shift, int64_t width, const std::string& fname,
                      const std::string& sname, at::ScalarType st, const at::Device& dev) {
  Affine m;
  if (factor.numel() == 0) return m;  // no map (its shift is ignored, as in ops.affine_reference_form)
  check_cuda(factor, fname.c_str(), dev);
  check_cuda(shift, sname.c_str(), dev);
  check_float(factor, fname.c_str());
  check_float(shift, sname.c_str());
  const int64_t C = factor.size(0);
  TORCH_CHECK(factor.dim() == 1 && width % C == 0, "ik_fast native CUDA: ", fname, " has shape ", factor.sizes(),
              ", expected (C,) for channels of the ", width, " units it scales");
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == width, "ik_fast native CUDA: ", sname, " has shape ", shift.sizes(),
              ", expected (", width, ",)");
  m.f = prep(factor, st);
  m.s = prep(shift, st);
  m.d = width / C;
  return m;
}

namespace {
// The column mean and sum of squared deviations (2, H) of the output of E rows from its tiles' partials part (nb, 2,
// H): each tile's column sums and squared deviations about its own mean, be rows a tile (the last one's the rest),
// merged as in Chan, Golub and LeVeque: M2 = sum_b M2_b + sum_b n_b (mean_b - mean)^2 (ATen reductions over the
// tiles, deterministic; nb x H, a be-th of the output).
at::Tensor merge_moments(const at::Tensor& part, int64_t E, int be) {
  const int64_t nb = part.size(0);
  at::Tensor n = at::full({nb, 1}, static_cast<double>(be), part.options());
  n.narrow(0, nb - 1, 1).fill_(static_cast<double>(E - (nb - 1) * be));
  const at::Tensor sums = part.select(1, 0);
  const at::Tensor mean = sums.sum(0) / static_cast<double>(E);
  const at::Tensor m2 = part.select(1, 1).sum(0) + ((sums / n - mean).square() * n).sum(0);
  return at::stack({mean, m2});
}
}  // namespace

at::Tensor trunk_forward(const at::Tensor& inp, const Affine& in_map, const std::vector<TrunkLayer>& layers,
                         std::vector<at::Tensor>* ys, std::vector<at::Tensor>* as, at::Tensor* moments) {
  const int64_t E = inp.size(0);
  if (layers.empty()) return inp;
  const int tc = gemm_mode(inp.scalar_type());
  if (ys != nullptr) {
    ys->clear();
    as->clear();
    for (const TrunkLayer& t : layers) {
      ys->push_back(at::empty({E, t.lout}, inp.options()));
      as->push_back(at::empty({E, t.hout}, inp.options()));
    }
  }
  at::Tensor cur = inp;
  for (size_t k0 = 0; k0 < layers.size(); k0 += kMaxLayers) {
    const size_t k1 = std::min(layers.size(), k0 + kMaxLayers);
    // the last layer's output goes straight into as.back() when saving and no affine map follows the activation
    const bool into_as = as != nullptr && k1 == layers.size() && !layers.back().bn.on();
    at::Tensor out = into_as ? as->back() : at::empty({E, layers[k1 - 1].hout}, inp.options());
    const Affine none;
    const Affine& first = k0 == 0 ? in_map : none;  // (later launches start from an output, after its map)
    // the last launch's kernel also gives its tiles' moments when asked for
    at::Tensor part;
    int be = 0;
    at::Tensor* pp = moments != nullptr && k1 == layers.size() ? &part : nullptr;
    if (E > 0) {
      AT_DISPATCH_FLOATING_TYPES(inp.scalar_type(), "ik_trunk_forward", [&] {
        dispatch_tc<scalar_t>(tc, [&](auto tcv) {
          launch_trunk_group<scalar_t, decltype(tcv)::value>(cur, first, out, layers, k0, k1, ys, as, pp, &be);
        });
      });
      if (pp != nullptr) *moments = merge_moments(part, E, be);
    }
    cur = out;
  }
  return cur;
}

at::Tensor trunk_backward(const at::Tensor& inp, const std::vector<TrunkLayer>& layers,
                          const std::vector<at::Tensor>& ys, const std::vector<at::Tensor>& as, at::Tensor dh,
                          std::vector<at::Tensor>* dweights, std::vector<at::Tensor>* dbiases,
                          std::vector<at::Tensor>* dact_bias, std::vector<at::Tensor>* dbn_factor,
                          std::vector<at::Tensor>* dbn_shift) {
  const size_t L = layers.size();
  dweights->assign(L, at::Tensor());
  dbiases->assign(L, at::Tensor());
  dact_bias->assign(L, at::Tensor());
  dbn_factor->assign(L, at::Tensor());
  dbn_shift->assign(L, at::Tensor());
  const int64_t E = inp.size(0);
  const int tc = gemm_mode(inp.scalar_type());
  // dh: the gradient of the current layer's output h_k (after its affine map)
  for (size_t kk = 0; kk < L; ++kk) {
    const size_t k = L - 1 - kk;
    const TrunkLayer& t = layers[k];
    if (t.bn.on()) {
      // h = a f[c] + s: df[c] = sum_{e, i} dh[e, c D + i] a[e, c D + i], ds = sum_e dh (da = dh f: in the kernels)
      (*dbn_factor)[k] = (dh * as[k]).sum(0).view({t.hout / t.bn.d, t.bn.d}).sum(1);
      (*dbn_shift)[k] = dh.sum(0);
    }
    at::Tensor dy = at::empty({E, t.lout}, dh.options());
    // a norm layer's act_bias: each edge's term (E, C nnt), summed over the edges below (deterministic, no atomics)
    const int64_t nab = t.act == kActNorm ? t.hout / t.id * t.nnt : 0;
    at::Tensor dab = nab > 0 ? at::empty({E, nab}, dh.options()) : at::Tensor();
    if (E > 0) {
      AT_DISPATCH_FLOATING_TYPES(inp.scalar_type(), "ik_act_backward", [&] {
        dispatch_tc<scalar_t>(
            tc, [&](auto tcv) { launch_act_backward<scalar_t, decltype(tcv)::value>(t, ys[k], dh, dy, dab); });
      });
    }
    if (t.act == kActNorm) (*dact_bias)[k] = nab > 0 ? dab.sum(0) : at::zeros({0}, dh.options());
    // the layer's input h_{k-1} (E, hin) is a_{k-1} f + s when layer k - 1 has an affine map: its weight gradient is
    // formed from the saved a_{k-1} as dW = (dy^T a_{k-1}) diag(f) + db s^T (no (E, hin) tensor for h_{k-1})
    const at::Tensor& ain = k == 0 ? inp : as[k - 1];
    const Affine none;
    const Affine& pm = k == 0 ? none : layers[k - 1].bn;
    const at::Tensor db = dy.sum(0);
    (*dbiases)[k] = db;
    // f per unit of the input (hin,)
    const at::Tensor fexp = pm.on() ? pm.f.unsqueeze(1).expand({t.hin / pm.d, pm.d}).reshape({t.hin}) : at::Tensor();
    if (t.cw_d == 0) {
      at::Tensor dw = gemm(dy.t(), ain);  // (lout, hin)
      if (pm.on()) dw.mul_(fexp.unsqueeze(0)).add_(db.unsqueeze(1) * pm.s.unsqueeze(0));  // (elementwise, no BLAS)
      (*dweights)[k] = dw;
      dh = gemm(dy, t.w);  // (E, hin)
    } else {
      const int64_t D = t.cw_d, Din = t.cw_din, dm = t.cw_dm, cout = t.lout / D, cin = t.hin / Din;
      const at::Tensor dyv = dy.view({E, cout, D});
      // m (Din, ...) by output component (D, ...): row a < dm itself, the others (a gated layer's gates) row t0
      auto sel = [&](const at::Tensor& m) {
        if (dm == D) return m;
        std::vector<int64_t> rep(static_cast<size_t>(m.dim()), -1);
        rep[0] = D - dm;
        return at::cat({m.narrow(0, 0, dm), m.narrow(0, t.cw_t0, 1).expand(rep)}, 0);
      };
      // by component (D, c) of a channel-major vector of c channels of Din components
      auto by_component = [&](const at::Tensor& v, int64_t c) { return sel(v.view({c, Din}).t()); };
      // ain by output component: (D, E, cin), ain[e, ci Din + src(a)]
      const at::Tensor av = sel(ain.view({E, cin, Din}).permute({2, 0, 1}));
      // dW[a, co, ci] = sum_e dy[e, co D + a] ain[e, ci Din + src(a)]
      at::Tensor dw = gemm(dyv.permute({2, 1, 0}), av);
      if (pm.on()) {
        // dW[a, co, ci] = f_u dW'[a, co, ci] + db[co D + a] s[u] with u = ci Din + src(a)
        dw.mul_(by_component(fexp, cin).unsqueeze(1))
            .add_(db.view({cout, D}).t().unsqueeze(2) * by_component(pm.s, cin).unsqueeze(1));
      }
      (*dweights)[k] = dw;
      // dh[e, ci Din + src(a)] += sum_co dy[e, co D + a] W[a, co, ci]
      const at::Tensor dsel = gemm(dyv.permute({2, 0, 1}), t.w);  // (D, E, cin)
      if (dm == D) {
        dh = dsel.permute({1, 2, 0}).reshape({E, t.hin});
      } else {
        // components a < dm into themselves, the gates' sum into t0 (no scatter: deterministic)
        at::Tensor d3 = at::zeros({E, cin, Din}, dh.options());
        d3.narrow(2, 0, dm).copy_(dsel.narrow(0, 0, dm).permute({1, 2, 0}));
        d3.select(2, t.cw_t0).add_(dsel.narrow(0, dm, D - dm).sum(0));
        dh = d3.view({E, t.hin});
      }
    }
  }
  return dh;
}

}  // namespace ik_fast_cuda
