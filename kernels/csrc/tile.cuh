// Shared tile engine of the codebook-search kernels: stages BM rows of x (or of a resident fp32
// residual) and BN codes into shared memory and accumulates their fp32 dot products into a
// BM x BN tile. Header-only device code, included by codebook_search_kernels.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace tessera {
namespace tile {
constexpr int BM = 32;        // rows of x per block
constexpr int BN = 64;        // codes per tile
constexpr int BK = 32;        // features per staged chunk
constexpr int THREADS = 128;  // 4 warps
constexpr int LDC = BN + 4;   // product tile stride (floats): rows stay 16-byte aligned for WMMA
constexpr int LDA_F = BM + 1; // SIMT tiles are stored k-major; +1 keeps the transposing stores
constexpr int LDB_F = BN + 1; //   conflict-free
constexpr int LDH = BK + 8;   // 16-bit tiles: WMMA needs a multiple of 8 elements

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ < 800)
constexpr bool kHasMma16 = false;  // bf16 WMMA needs sm_80; older archs take the SIMT path
#else
constexpr bool kHasMma16 = true;
#endif

template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};

template <typename T> struct UseMma { static constexpr bool value = kHasMma16 && !std::is_same<T, float>::value; };

struct SimtStage {
  float a[BK][LDA_F];
  float b[BK][LDB_F];
};
template <typename T> struct MmaStage {
  alignas(32) T a_hi[BM][LDH];
  alignas(32) T a_lo[BM][LDH];
  alignas(32) T b[BN][LDH];
};
template <typename T> using Stage = typename std::conditional<UseMma<T>::value, MmaStage<T>, SimtStage>::type;

struct Smem {
  float* cs;          // BM x LDC products of the current tile
  void* stage;        // Stage<T>
  const float* resident;  // BM x C fp32 residual, or nullptr to stream rows of x
};

// A operand value (row r, feature cc) as fp32: from the resident residual or from x; zero padding.
template <typename T>
__device__ __forceinline__ float load_a(const T* __restrict__ x, const Smem& sm, int64_t row0, int64_t n_rows,
                                        int C, int r, int cc) {
  if (cc >= C) return 0.f;
  if (sm.resident != nullptr) return sm.resident[r * C + cc];
  const int64_t n = row0 + r;
  return n < n_rows ? Cvt<T>::to_f(x[n * C + cc]) : 0.f;
}

// sm.cs <- x_rows . e_codes^T for codes [code0, code0 + BN). Ends with a barrier.
template <typename T>
__device__ void tile_products(const T* __restrict__ x, const T* __restrict__ cb, int64_t row0, int64_t n_rows,
                              int code0, int K, int C, bool split_a, const Smem& sm) {
  const int tid = threadIdx.x;
  if constexpr (!UseMma<T>::value) {
    SimtStage& st = *static_cast<SimtStage*>(sm.stage);
    const int ty = tid / 16, tx = tid % 16;  // thread owns rows ty + 8i, codes tx + 16j
    float acc[4][4] = {};
    for (int c0 = 0; c0 < C; c0 += BK) {
#pragma unroll
      for (int e = 0; e < BM * BK / THREADS; ++e) {
        const int idx = tid + e * THREADS, r = idx / BK, c = idx % BK;
        st.a[c][r] = load_a(x, sm, row0, n_rows, C, r, c0 + c);
      }
#pragma unroll
      for (int e = 0; e < BN * BK / THREADS; ++e) {
        const int idx = tid + e * THREADS, n = idx / BK, c = idx % BK;
        const int code = code0 + n, cc = c0 + c;
        st.b[c][n] = (code < K && cc < C) ? Cvt<T>::to_f(cb[(int64_t)code * C + cc]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < BK; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = st.a[k][ty + 8 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = st.b[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sm.cs[(ty + 8 * i) * LDC + tx + 16 * j] = acc[i][j];
  } else {
    using namespace nvcuda;
    MmaStage<T>& st = *static_cast<MmaStage<T>*>(sm.stage);
    const int warp = tid / 32;  // warp owns codes [16 warp, 16 warp + 16) for both 16-row halves
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    const T zero = Cvt<T>::from_f(0.f);
    for (int c0 = 0; c0 < C; c0 += BK) {
#pragma unroll
      for (int e = 0; e < BM * BK / THREADS; ++e) {
        const int idx = tid + e * THREADS, r = idx / BK, c = idx % BK;
        const float v = load_a(x, sm, row0, n_rows, C, r, c0 + c);
        const T hi = Cvt<T>::from_f(v);
        st.a_hi[r][c] = hi;
        if (split_a) st.a_lo[r][c] = Cvt<T>::from_f(v - Cvt<T>::to_f(hi));
      }
#pragma unroll
      for (int e = 0; e < BN * BK / THREADS; ++e) {
        const int idx = tid + e * THREADS, n = idx / BK, c = idx % BK;
        const int code = code0 + n, cc = c0 + c;
        st.b[n][c] = (code < K && cc < C) ? cb[(int64_t)code * C + cc] : zero;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b_frag;
        wmma::load_matrix_sync(b_frag, &st.b[warp * 16][kk], LDH);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_frag;
          wmma::load_matrix_sync(a_frag, &st.a_hi[h * 16][kk], LDH);
          wmma::mma_sync(acc[h], a_frag, b_frag, acc[h]);
          if (split_a) {
            wmma::load_matrix_sync(a_frag, &st.a_lo[h * 16][kk], LDH);
            wmma::mma_sync(acc[h], a_frag, b_frag, acc[h]);
          }
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
      wmma::store_matrix_sync(sm.cs + h * 16 * LDC + warp * 16, acc[h], LDC, wmma::mem_row_major);
  }
  __syncthreads();
}

}  // namespace tile
}  // namespace tessera
