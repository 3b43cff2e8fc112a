// The Python module of the native extension (ik_fast._C, or the JIT-compiled copy: ik_fast/_native.py): importing it
// registers the kernels of csrc/cpu (and csrc/cuda) for the ops that ik_fast/ops.py defined before the import. Its
// Python surface is a little introspection only; the kernels are reached through torch.ops.ik_fast.native_*.
#include <torch/extension.h>

#include "ik_fast.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define IK_FAST_STR2(x) #x
#define IK_FAST_STR(x) IK_FAST_STR2(x)

namespace {

bool cuda_built() {
#ifdef IK_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

std::string cpu_capability() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

// One literal, so that the loader can read the hash from the file without importing it (importing registers the
// kernels, and a stale module's must not be registered before a fresh build's): ik_fast/_native.py looks for the
// prefix. The build passes the hash as h<hex>, a plain token.
#ifdef IK_FAST_SOURCE_HASH
const char kSourceHash[] = "ik_fast-source-hash:" IK_FAST_STR(IK_FAST_SOURCE_HASH) ";";
#else
const char kSourceHash[] = "ik_fast-source-hash:h;";
#endif

std::string source_hash() {
  std::string s = kSourceHash;
  return s.substr(s.find(':') + 2, s.size() - s.find(':') - 3);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ik_fast's native kernels (registered for torch.ops.ik_fast.native_*) and their build facts";
  m.def("cuda_built", &cuda_built, "whether the CUDA kernels were compiled in");
  m.def("openmp", &openmp, "whether the CPU kernels were compiled with OpenMP (at::parallel_for runs in parallel)");
  m.def("cpu_capability", &cpu_capability, "the vector ISA of at::vec::Vectorized in the CPU kernels");
  m.def("num_threads", &at::get_num_threads, "ATen's intra-op thread count (torch.set_num_threads sets it)");
  m.def("source_hash", &source_hash, "hash of the csrc/ sources this module was built from");
}
