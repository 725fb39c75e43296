// Torch bindings of the codebook-search kernels. Validation of user input happens in Python
// (kernels/_checks.py); the TORCH_CHECKs here guard the binding's own contract so a misuse from
// Python fails with a message instead of reading out of bounds.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "codebook_search.h"

namespace {

using tessera::ScalarKind;
using tessera::SearchArgs;
using tessera::SearchMode;

ScalarKind kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ScalarKind::kFloat32;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kHalf: return ScalarKind::kFloat16;
    default: TORCH_CHECK(false, "codebook search supports float32, bfloat16 and float16, got ", t.scalar_type());
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& sqnorm) {
  TORCH_CHECK(x.is_cuda() && codebook.is_cuda() && sqnorm.is_cuda(), "all tensors must be CUDA tensors");
  TORCH_CHECK(x.get_device() == codebook.get_device() && x.get_device() == sqnorm.get_device(),
              "all tensors must be on the same device");
  TORCH_CHECK(x.dim() == 2, "x must be N x C");
  TORCH_CHECK(codebook.dim() == 2 || codebook.dim() == 3, "codebook must be K x C or D x K x C");
  TORCH_CHECK(x.scalar_type() == codebook.scalar_type(), "x and codebook must share a dtype");
  TORCH_CHECK(sqnorm.scalar_type() == at::kFloat, "sqnorm must be float32");
  TORCH_CHECK(x.is_contiguous() && codebook.is_contiguous() && sqnorm.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(x.size(1) == codebook.size(-1), "x and codebook differ in C");
  TORCH_CHECK(codebook.size(-2) >= 1 && codebook.size(-1) >= 1, "empty codebook");
  TORCH_CHECK(codebook.size(-2) <= INT32_MAX && codebook.size(-1) <= INT32_MAX, "codebook too large");
  TORCH_CHECK(sqnorm.numel() == codebook.numel() / codebook.size(-1), "sqnorm must have one entry per code");
}

SearchArgs base_args(const at::Tensor& x, const at::Tensor& codebook, const at::Tensor& sqnorm) {
  SearchArgs a;
  a.x = x.data_ptr();
  a.codebook = codebook.data_ptr();
  a.sqnorm = sqnorm.data_ptr<float>();
  a.n_rows = x.size(0);
  a.n_codes = static_cast<int32_t>(codebook.size(-2));
  a.n_feat = static_cast<int32_t>(codebook.size(-1));
  return a;
}

void launch(const SearchArgs& a, ScalarKind kind) {
  const cudaError_t err = tessera::launch_search(a, kind, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "codebook search kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> nearest_code(const at::Tensor& x, const at::Tensor& codebook,
                                                const at::Tensor& sqnorm) {
  check_inputs(x, codebook, sqnorm);
  TORCH_CHECK(codebook.dim() == 2, "nearest_code takes a K x C codebook");
  const c10::cuda::CUDAGuard guard(x.device());
  auto codes = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  auto sqdist = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  SearchArgs a = base_args(x, codebook, sqnorm);
  a.mode = SearchMode::kArgmin;
  a.codes = codes.data_ptr<int64_t>();
  a.sqdist = sqdist.data_ptr<float>();
  launch(a, kind_of(x));
  return {codes, sqdist};
}

bool residual_fits(int64_t n_feat, int64_t device) {
  // The kernel is instantiated per dtype; bf16/fp16 and fp32 tiles differ in static shared memory,
  // so answer for the largest (conservative for every dtype).
  const int d = static_cast<int>(device);
  const int c = static_cast<int>(n_feat);
  return tessera::resident_fits(ScalarKind::kFloat32, c, d) && tessera::resident_fits(ScalarKind::kBFloat16, c, d) &&
         tessera::resident_fits(ScalarKind::kFloat16, c, d);
}

std::tuple<at::Tensor, at::Tensor> residual_quantize(const at::Tensor& x, const at::Tensor& codebook,
                                                     const at::Tensor& sqnorm, int64_t depth) {
  check_inputs(x, codebook, sqnorm);
  TORCH_CHECK(depth >= 1 && depth <= INT32_MAX, "depth must be >= 1");
  TORCH_CHECK(codebook.dim() == 2 || codebook.size(0) == depth, "per-depth codebook must have depth entries");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(residual_fits(x.size(1), x.get_device()),
              "residual tile of C=", x.size(1), " does not fit in shared memory; use the per-depth path");
  const int64_t N = x.size(0), C = x.size(1);
  auto codes = at::empty({N, depth}, x.options().dtype(at::kLong));
  auto partial = at::empty({N, depth, C}, x.options().dtype(at::kFloat));
  SearchArgs a = base_args(x, codebook, sqnorm);
  a.depth = static_cast<int32_t>(depth);
  a.codebook_depth_stride = codebook.dim() == 3 ? codebook.size(1) * C : 0;
  a.sqnorm_depth_stride = codebook.dim() == 3 ? codebook.size(1) : 0;
  a.mode = SearchMode::kArgmin;
  a.resident = true;
  a.codes = codes.data_ptr<int64_t>();
  a.partial = partial.data_ptr<float>();
  launch(a, kind_of(x));
  return {codes, partial};
}

std::tuple<at::Tensor, at::Tensor> soft_codes(const at::Tensor& residual, const at::Tensor& codebook,
                                              const at::Tensor& sqnorm, double tau, bool sample, int64_t seed) {
  check_inputs(residual, codebook, sqnorm);
  TORCH_CHECK(codebook.dim() == 2, "soft_codes takes a K x C codebook");
  TORCH_CHECK(tau > 0, "tau must be positive");
  const c10::cuda::CUDAGuard guard(residual.device());
  const int64_t N = residual.size(0), K = codebook.size(0);
  auto probs = at::empty({N, K}, residual.options().dtype(at::kFloat));
  auto stats = at::empty({2, N}, residual.options().dtype(at::kFloat));
  auto sampled = at::empty({sample ? N : 0}, residual.options().dtype(at::kLong));
  SearchArgs a = base_args(residual, codebook, sqnorm);
  a.tau = static_cast<float>(tau);
  a.row_min = stats.data_ptr<float>();
  a.row_sum = a.row_min + N;
  a.mode = SearchMode::kSoftStats;
  launch(a, kind_of(residual));
  a.mode = SearchMode::kSoftWrite;
  a.probs = probs.data_ptr<float>();
  a.sample = sample;
  a.seed = static_cast<uint64_t>(seed);
  a.codes = sample ? sampled.data_ptr<int64_t>() : nullptr;
  launch(a, kind_of(residual));
  return {probs, sampled};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Tessera codebook search: fused tiled distance + argmin/softmax CUDA kernels";
  m.def("nearest_code", &nearest_code, "nearest code and exact squared distance per row");
  m.def("residual_fits", &residual_fits, "whether the one-launch residual kernel fits this device for C");
  m.def("residual_quantize", &residual_quantize, "all residual-quantisation depths in one launch");
  m.def("soft_codes", &soft_codes, "softmax over codes (two passes) with optional Gumbel-max sample");
}
