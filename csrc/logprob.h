// Shared declarations for the token log-prob kernels (CPU in logprob.cpp, CUDA in logprob_cuda.cu).
//
// Layout contract (checked once in check_inputs, relied on by every kernel):
//   logits  [..., V], any floating dtype, last dimension contiguous (stride 1), leading dimensions
//           with any strides (so a shifted view such as logits[:, :-1] needs no copy);
//   labels  int64 of logits.shape[:-1], contiguous;
//   logp, lse  float32 (float64 for float64 logits) of logits.shape[:-1], contiguous.
// A row r of the flattened leading dimensions starts at RowIndexer::offset(r) elements.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace allo {

constexpr int kMaxLeadingDims = 8;

struct RowIndexer {
  int32_t ndim;
  int64_t sizes[kMaxLeadingDims];
  int64_t strides[kMaxLeadingDims];

#if defined(__CUDACC__)
  __host__ __device__
#endif
  inline int64_t offset(int64_t row) const {
    int64_t off = 0;
    for (int32_t d = ndim - 1; d >= 0; --d) {
      const int64_t i = row % sizes[d];
      row /= sizes[d];
      off += i * strides[d];
    }
    return off;
  }
};

// Validates shapes/dtypes/devices (errors name the argument) and returns the number of rows.
int64_t check_inputs(const at::Tensor& logits, const at::Tensor& labels, const char* op);
void check_backward_inputs(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& lse, const char* op);
// token_logprob_bwd_inplace on a slice of the vocabulary: validates that the logits' V columns are
// columns [vocab_start, vocab_start + V) of rows over a vocabulary of vocab_size (-1: V, the whole
// rows) and returns that vocabulary size, the bound labels are checked against.
int64_t check_vocab_slice(int64_t vocab_start, int64_t vocab_size, int64_t V, const char* op);
RowIndexer make_row_indexer(const at::Tensor& logits);
at::ScalarType accumulate_type(at::ScalarType logits_dtype);

// Calls f(scalar_t{}, acc_t{}) for the logits' dtype: fp32/bf16/fp16 accumulate in float, fp64 in double.
template <typename F>
void dispatch_floating(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}, float{}); break;
    case at::kHalf: f(c10::Half{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    default: TORCH_CHECK(false, "allo token_logprob: unsupported logits dtype ", dt);
  }
}

}  // namespace allo
