// Interface between the torch-facing bindings (codebook_search.cpp, compiled by the host compiler)
// and the kernels (codebook_search_kernels.cu, compiled by nvcc). Only plain pointers cross it, so the .cu
// never includes torch headers: that keeps nvcc fast and the kernels independent of ATen.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace tessera {

enum class ScalarKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// kArgmin: nearest code per row (with resident=true: all depths of residual quantisation).
// kSoftStats / kSoftWrite: the two passes of soft_codes (row max/sum, then probs and sample).
enum class SearchMode : int { kArgmin = 0, kSoftStats = 1, kSoftWrite = 2 };

struct SearchArgs {
  const void* x = nullptr;          // N x C, elements of ScalarKind
  const void* codebook = nullptr;   // K x C, or D x K x C with codebook_depth_stride = K * C
  const float* sqnorm = nullptr;    // ||e||^2 in fp32: K, or D x K with sqnorm_depth_stride = K
  int64_t n_rows = 0;
  int32_t n_codes = 0;
  int32_t n_feat = 0;
  int32_t depth = 1;
  int64_t codebook_depth_stride = 0;  // 0: one codebook shared by all depths
  int64_t sqnorm_depth_stride = 0;
  SearchMode mode = SearchMode::kArgmin;
  bool resident = false;            // keep the fp32 residual in shared memory across depths
  int64_t* codes = nullptr;         // kArgmin: N x depth; kSoftWrite: N samples (if sample)
  float* sqdist = nullptr;          // kArgmin, non-resident: ||x - e_idx||^2
  float* partial = nullptr;         // resident: N x depth x C partial sums
  float* row_min = nullptr;         // soft: per-row min surrogate distance (pass 1 out, pass 2 in)
  float* row_sum = nullptr;         // soft: per-row sum of exp((min - d) / tau)
  float* probs = nullptr;           // kSoftWrite: N x K
  float tau = 1.0f;
  uint64_t seed = 0;
  bool sample = false;
};

// Shared-memory bytes a block needs beyond its static tiles to keep an fp32 residual of width C.
size_t resident_dynamic_smem(int n_feat);

// True if the resident residual kernel for this dtype and C fits the current device.
bool resident_fits(ScalarKind kind, int n_feat, int device);

// Launches on `stream`; returns the first CUDA error (configuration or launch), cudaSuccess else.
cudaError_t launch_search(const SearchArgs& args, ScalarKind kind, cudaStream_t stream);

}  // namespace tessera
