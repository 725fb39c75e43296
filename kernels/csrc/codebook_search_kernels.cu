// Codebook-search kernels: fused GEMM tiles of x.e with the argmin / softmax in the epilogue, so
// the N x K distance matrix never reaches global memory (soft_codes writes only the final probs).
//
// One block owns BM rows of x and sweeps all K codes in tiles of BN. Per tile the x.e products are
// accumulated in fp32 into a shared BM x BN tile:
//   * fp32 inputs: SIMT fp32 FMA (no TF32: the search promises fp32 products);
//   * bf16 / fp16 inputs (sm_80+): WMMA tensor cores, exact products, fp32 accumulation.
//     An fp32 residual (residual quantisation) is split into hi + lo halves of the input type and
//     multiplied twice, which keeps ~16 of its 24 mantissa bits instead of 8 (bf16) / 11 (fp16).
// The epilogue turns products into the surrogate d = ||e||^2 - 2 x.e and keeps per-thread running
// results across tiles; rules (finite-only candidates, lowest index on ties, -1 when none) match
// kernels/reference.py.
#include "codebook_search.h"
#include "tile.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

namespace tessera {
namespace {
using namespace tile;

// Candidate (d, i) beats (bd, bi): finite distances only (i >= 0), smaller d, then lower index.
__device__ __forceinline__ bool beats(float d, int i, float bd, int bi) {
  return i >= 0 && (bi < 0 || d < bd || (d == bd && i < bi));
}

__device__ __forceinline__ bool selectable(float d) { return d > -CUDART_INF_F && d < CUDART_INF_F; }

// Running argmin over all codes of one depth; thread (r = tid / 4, q = tid % 4) scans codes
// q, q + 4, ... of each tile (conflict-free reads of the product tile). Result in best_s[r].
template <typename T>
__device__ void argmin_all_codes(const T* __restrict__ x, const T* __restrict__ cb, const float* __restrict__ sq,
                                 int64_t row0, int64_t n_rows, int K, int C, bool split_a, const Smem& sm,
                                 int* best_s) {
  const int r = threadIdx.x / 4, q = threadIdx.x % 4;
  float bd = CUDART_INF_F;
  int bi = -1;
  for (int code0 = 0; code0 < K; code0 += BN) {
    tile_products(x, cb, row0, n_rows, code0, K, C, split_a, sm);
    // Ascending scan with strict '<' keeps this thread's lowest index among equal minima.
#pragma unroll 4
    for (int j = 0; j < BN / 4; ++j) {
      const int code = code0 + q + 4 * j;
      if (code < K) {
        const float d = fmaf(-2.f, sm.cs[r * LDC + q + 4 * j], sq[code]);
        if (selectable(d) && d < bd) { bd = d; bi = code; }
      }
    }
    __syncthreads();  // the next tile overwrites sm.cs
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    const float od = __shfl_xor_sync(0xffffffffu, bd, off);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
    if (beats(od, oi, bd, bi)) { bd = od; bi = oi; }
  }
  if (q == 0) best_s[r] = bi;
  __syncthreads();
}

// nearest_code: argmin, then ||x - e_idx||^2 recomputed in fp32 by one warp per row.
template <typename T>
__device__ void run_nearest(const SearchArgs& a, int64_t row0, const Smem& sm, int* best_s) {
  const T* x = static_cast<const T*>(a.x);
  const T* cb = static_cast<const T*>(a.codebook);
  argmin_all_codes(x, cb, a.sqnorm, row0, a.n_rows, a.n_codes, a.n_feat, false, sm, best_s);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, C = a.n_feat;
  for (int r = warp; r < BM; r += THREADS / 32) {
    const int64_t n = row0 + r;
    if (n >= a.n_rows) break;
    const int64_t b = best_s[r];
    float acc = 0.f;
    if (b >= 0) {
      for (int c = lane; c < C; c += 32) {
        const float diff = Cvt<T>::to_f(x[n * C + c]) - Cvt<T>::to_f(cb[b * C + c]);
        acc = fmaf(diff, diff, acc);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
      a.codes[n] = b;
      a.sqdist[n] = b >= 0 ? acc : CUDART_NAN_F;
    }
  }
}

// residual_quantize: the block's fp32 residual lives in shared memory for all depths.
template <typename T>
__device__ void run_residual(const SearchArgs& a, int64_t row0, Smem sm, float* resident, int* best_s) {
  const T* x = static_cast<const T*>(a.x);
  const int C = a.n_feat, D = a.depth;
  for (int idx = threadIdx.x; idx < BM * C; idx += THREADS) {
    const int64_t n = row0 + idx / C;
    resident[idx] = n < a.n_rows ? Cvt<T>::to_f(x[n * C + idx % C]) : 0.f;
  }
  __syncthreads();
  sm.resident = resident;
  for (int d = 0; d < D; ++d) {
    const T* cb = static_cast<const T*>(a.codebook) + d * a.codebook_depth_stride;
    const float* sq = a.sqnorm + d * a.sqnorm_depth_stride;
    argmin_all_codes(x, cb, sq, row0, a.n_rows, a.n_codes, C, true, sm, best_s);
    if (threadIdx.x < BM && row0 + threadIdx.x < a.n_rows) a.codes[(row0 + threadIdx.x) * D + d] = best_s[threadIdx.x];
    // Same (row, feature) -> thread mapping every depth, so each thread re-reads only the partial
    // sums it wrote itself at depth d - 1. residual = x - partial, as in the reference.
    for (int idx = threadIdx.x; idx < BM * C; idx += THREADS) {
      const int r = idx / C, c = idx % C;
      const int64_t n = row0 + r;
      if (n >= a.n_rows) continue;
      const int64_t b = best_s[r];
      const float e = b >= 0 ? Cvt<T>::to_f(cb[b * C + c]) : CUDART_NAN_F;
      const float ps = d == 0 ? e : a.partial[(n * D + d - 1) * C + c] + e;
      a.partial[(n * D + d) * C + c] = ps;
      resident[idx] = Cvt<T>::to_f(x[n * C + c]) - ps;
    }
    __syncthreads();
  }
}

// soft pass 1: per-row min surrogate m and s = sum_k exp((m - d_k) / tau), online over tiles.
template <typename T>
__device__ void run_soft_stats(const SearchArgs& a, int64_t row0, const Smem& sm) {
  const T* x = static_cast<const T*>(a.x);
  const T* cb = static_cast<const T*>(a.codebook);
  const int r = threadIdx.x / 4, q = threadIdx.x % 4, K = a.n_codes;
  const float tau = a.tau;
  float m = CUDART_INF_F, s = 0.f;
  for (int code0 = 0; code0 < K; code0 += BN) {
    tile_products(x, cb, row0, a.n_rows, code0, K, a.n_feat, false, sm);
    for (int j = 0; j < BN / 4; ++j) {
      const int code = code0 + q + 4 * j;
      if (code >= K) break;
      const float d = fmaf(-2.f, sm.cs[r * LDC + q + 4 * j], a.sqnorm[code]);
      if (!selectable(d)) continue;
      if (d < m) {  // rescale the sum to the new minimum (s is 0 while m is still +inf)
        s = (m == CUDART_INF_F ? 0.f : s * expf((d - m) / tau)) + 1.f;
        m = d;
      } else {
        s += expf((m - d) / tau);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, m, off);
    const float os = __shfl_xor_sync(0xffffffffu, s, off);
    const float nm = fminf(m, om);
    s = (m == CUDART_INF_F ? 0.f : s * expf((nm - m) / tau)) + (om == CUDART_INF_F ? 0.f : os * expf((nm - om) / tau));
    m = nm;
  }
  const int64_t n = row0 + r;
  if (q == 0 && n < a.n_rows) {
    a.row_min[n] = m;
    a.row_sum[n] = s;
  }
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in (0, 1) from (seed, element): 23 random bits + 0.5 keeps both ends open in fp32.
__device__ __forceinline__ float uniform_open(uint64_t seed, uint64_t key) {
  const uint64_t h = mix64(seed ^ mix64(key + 0x9E3779B97F4A7C15ull));
  return (static_cast<float>(h >> 41) + 0.5f) * (1.0f / 8388608.0f);
}

// soft pass 2: write probs (coalesced: a warp covers 32 consecutive codes of one row) and draw
// one Gumbel-max sample per row: argmax_k (m - d_k) / tau + G_k is distributed as the probs.
template <typename T>
__device__ void run_soft_write(const SearchArgs& a, int64_t row0, const Smem& sm, float* red_v, int* red_i) {
  const T* x = static_cast<const T*>(a.x);
  const T* cb = static_cast<const T*>(a.codebook);
  const int col = threadIdx.x % BN, rbase = threadIdx.x / BN, K = a.n_codes;
  constexpr int ROWS = BM / (THREADS / BN);  // rows per thread: rbase + 2i
  float m[ROWS], inv_s[ROWS], gv[ROWS];
  int gi[ROWS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int64_t n = row0 + rbase + 2 * i;
    m[i] = n < a.n_rows ? a.row_min[n] : CUDART_INF_F;
    inv_s[i] = n < a.n_rows ? 1.f / a.row_sum[n] : 0.f;
    gv[i] = -CUDART_INF_F;
    gi[i] = -1;
  }
  for (int code0 = 0; code0 < K; code0 += BN) {
    tile_products(x, cb, row0, a.n_rows, code0, K, a.n_feat, false, sm);
    const int code = code0 + col;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int r = rbase + 2 * i;
      const int64_t n = row0 + r;
      if (code >= K || n >= a.n_rows) continue;
      const float d = fmaf(-2.f, sm.cs[r * LDC + col], a.sqnorm[code]);
      const bool row_ok = m[i] < CUDART_INF_F, ok = row_ok && selectable(d);
      const float logit = ok ? (m[i] - d) / a.tau : -CUDART_INF_F;
      a.probs[n * K + code] = row_ok ? (ok ? expf(logit) * inv_s[i] : 0.f) : CUDART_NAN_F;
      if (a.sample && ok) {
        const float u = uniform_open(a.seed, static_cast<uint64_t>(n) * static_cast<uint64_t>(K) + code);
        const float score = logit - logf(-logf(u));
        if (score > gv[i]) { gv[i] = score; gi[i] = code; }
      }
    }
    __syncthreads();
  }
  if (!a.sample) return;
  const int lane = threadIdx.x % 32, half = (threadIdx.x / 32) % 2;  // which 32 codes of the 64
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    float v = gv[i];
    int id = gi[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const int oi = __shfl_xor_sync(0xffffffffu, id, off);
      if (oi >= 0 && (id < 0 || ov > v || (ov == v && oi < id))) { v = ov; id = oi; }
    }
    if (lane == 0) {
      red_v[(rbase + 2 * i) * 2 + half] = v;
      red_i[(rbase + 2 * i) * 2 + half] = id;
    }
  }
  __syncthreads();
  if (threadIdx.x < BM && row0 + threadIdx.x < a.n_rows) {
    const int r = threadIdx.x;
    const bool second = red_i[r * 2 + 1] >= 0 &&
                        (red_i[r * 2] < 0 || red_v[r * 2 + 1] > red_v[r * 2] ||
                         (red_v[r * 2 + 1] == red_v[r * 2] && red_i[r * 2 + 1] < red_i[r * 2]));
    a.codes[row0 + r] = red_i[r * 2 + (second ? 1 : 0)];
  }
}

// One kernel per mode so each gets its own register allocation (a merged kernel pays the
// maximum of all modes in occupancy).
#define TESSERA_TILE_SMEM(T)                                                 \
  __shared__ __align__(128) unsigned char stage_raw[sizeof(Stage<T>)];      \
  __shared__ __align__(128) float cs[BM * LDC];                             \
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;               \
  Smem sm{cs, stage_raw, nullptr}

template <typename T>
__global__ void __launch_bounds__(THREADS) nearest_kernel(const SearchArgs a) {
  TESSERA_TILE_SMEM(T);
  __shared__ int best_s[BM];
  run_nearest<T>(a, row0, sm, best_s);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) residual_kernel(const SearchArgs a) {
  TESSERA_TILE_SMEM(T);
  __shared__ int best_s[BM];
  extern __shared__ __align__(16) float resident[];  // BM x C
  run_residual<T>(a, row0, sm, resident, best_s);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) soft_stats_kernel(const SearchArgs a) {
  TESSERA_TILE_SMEM(T);
  run_soft_stats<T>(a, row0, sm);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) soft_write_kernel(const SearchArgs a) {
  TESSERA_TILE_SMEM(T);
  __shared__ float red_v[BM * 2];
  __shared__ int red_i[BM * 2];
  run_soft_write<T>(a, row0, sm, red_v, red_i);
}
#undef TESSERA_TILE_SMEM

template <typename T>
cudaError_t launch_typed(const SearchArgs& a, cudaStream_t stream) {
  if (a.n_rows == 0) return cudaSuccess;
  const int64_t blocks64 = (a.n_rows + BM - 1) / BM;
  if (blocks64 > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 blocks(static_cast<unsigned int>(blocks64));
  if (a.mode == SearchMode::kArgmin && a.resident) {
    const size_t dyn = resident_dynamic_smem(a.n_feat);
    // Above 48 KiB a block must opt in to its dynamic shared memory.
    const cudaError_t err =
        cudaFuncSetAttribute(residual_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn));
    if (err != cudaSuccess) return err;
    residual_kernel<T><<<blocks, THREADS, dyn, stream>>>(a);
  } else if (a.mode == SearchMode::kArgmin) {
    nearest_kernel<T><<<blocks, THREADS, 0, stream>>>(a);
  } else if (a.mode == SearchMode::kSoftStats) {
    soft_stats_kernel<T><<<blocks, THREADS, 0, stream>>>(a);
  } else {
    soft_write_kernel<T><<<blocks, THREADS, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
bool fits_typed(int n_feat, int device) {
  cudaFuncAttributes attr{};
  int optin = 0;
  if (cudaFuncGetAttributes(&attr, residual_kernel<T>) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) return false;
  return attr.sharedSizeBytes + resident_dynamic_smem(n_feat) <= static_cast<size_t>(optin);
}

}  // namespace

size_t resident_dynamic_smem(int n_feat) { return static_cast<size_t>(BM) * n_feat * sizeof(float); }

bool resident_fits(ScalarKind kind, int n_feat, int device) {
  switch (kind) {
    case ScalarKind::kFloat32: return fits_typed<float>(n_feat, device);
    case ScalarKind::kBFloat16: return fits_typed<__nv_bfloat16>(n_feat, device);
    case ScalarKind::kFloat16: return fits_typed<__half>(n_feat, device);
  }
  return false;
}

cudaError_t launch_search(const SearchArgs& args, ScalarKind kind, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::kFloat32: return launch_typed<float>(args, stream);
    case ScalarKind::kBFloat16: return launch_typed<__nv_bfloat16>(args, stream);
    case ScalarKind::kFloat16: return launch_typed<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tessera
