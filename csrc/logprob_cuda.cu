// CUDA kernels for allo::token_logprob_fwd / _bwd / _bwd_inplace (the schema and CPU kernels are in
// logprob.cpp, the layout contract in logprob.h).
//
// One thread block per token row. Forward: each thread walks the row with 16-byte loads (8 bf16/fp16,
// 4 fp32, 2 fp64 values), keeps an online (max, sum of exp) pair in the accumulate type and rescales
// the sum once per 16-byte vector when the maximum grows; the pairs are merged with warp shuffles,
// then across warps through shared memory. Backward reads the row once more and writes
// g * (onehot(y) - exp(x - lse)) with 16-byte stores, element by element in the same thread that read
// it, so it may write into the logits' own buffer.
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuSPARSE/cuBLAS headers
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "logprob.h"

namespace allo {
namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t exp_acc(acc_t x) {
  return exp(x);
}
template <>
__device__ __forceinline__ float exp_acc<float>(float x) {
  return __expf(x);
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -INFINITY;
}

// NaN handling (as log_softmax + gather, and as the CPU kernel): a NaN anywhere in a row makes its lse
// and logp NaN. The running maximum propagates NaN (fmax and `x > m` would drop it) and, once NaN,
// stays NaN (`x > NaN` is false): then l = m + log(s) is NaN whatever s holds.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;  // b when b is NaN and a is not
}

// Folds one value into the running (max m, sum s of exp(x - m)).
template <typename acc_t>
__device__ __forceinline__ void online_add(acc_t& m, acc_t& s, acc_t x) {
  if (x > m || x != x) {
    s = (m == neg_inf<acc_t>()) ? acc_t(0) : s * exp_acc(m - x);
    m = x;
  }
  if (m != neg_inf<acc_t>()) s += exp_acc(x - m);
}

template <typename acc_t>
__device__ __forceinline__ void online_merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const acc_t mn = nan_max(m, m2);
  if (mn == neg_inf<acc_t>()) return;  // both empty so far
  s = s * exp_acc(m - mn) + s2 * exp_acc(m2 - mn);
  m = mn;
}

// Elements of a row before its first 16-byte boundary; the vector loop starts there.
template <typename scalar_t>
__device__ __forceinline__ int64_t head_elements(const scalar_t* p, int64_t V) {
  const int64_t h = static_cast<int64_t>(((16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15) / sizeof(scalar_t));
  return h < V ? h : V;
}

template <typename scalar_t, typename acc_t, int THREADS>
__global__ void __launch_bounds__(THREADS) fwd_kernel(const scalar_t* __restrict__ logits, RowIndexer idx,
                                                      const int64_t* __restrict__ labels, int64_t V,
                                                      int64_t ignore_index, acc_t* __restrict__ logp,
                                                      acc_t* __restrict__ lse, int64_t vocab_start,
                                                      int64_t vocab_size) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t y = labels[r];
  if (y == ignore_index) {
    if (tid == 0) {
      logp[r] = acc_t(0);
      lse[r] = acc_t(0);
    }
    return;
  }
  CUDA_KERNEL_ASSERT(y >= 0 && y < vocab_size && "token_logprob_fwd: label outside the vocabulary and not ignore_index");
  const scalar_t* row = logits + idx.offset(r);

  acc_t m = neg_inf<acc_t>(), s = acc_t(0);
  const int64_t head = head_elements(row, V);
  for (int64_t i = tid; i < head; i += THREADS) online_add(m, s, static_cast<acc_t>(row[i]));
  const int64_t nvec = (V - head) / VEC;
  const uint4* vrow = reinterpret_cast<const uint4*>(row + head);
  for (int64_t k = tid; k < nvec; k += THREADS) {
    const uint4 raw = __ldcs(vrow + k);  // streamed: each byte is read once here
    scalar_t vals[VEC];
    memcpy(vals, &raw, 16);
    acc_t vm = static_cast<acc_t>(vals[0]);
#pragma unroll
    for (int j = 1; j < VEC; ++j) vm = nan_max(vm, static_cast<acc_t>(vals[j]));
    if (vm > m || vm != vm) {
      s = (m == neg_inf<acc_t>()) ? acc_t(0) : s * exp_acc(m - vm);
      m = vm;
    }
    if (m != neg_inf<acc_t>()) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += exp_acc(static_cast<acc_t>(vals[j]) - m);
    }
  }
  for (int64_t i = head + nvec * VEC + tid; i < V; i += THREADS) online_add(m, s, static_cast<acc_t>(row[i]));

#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const acc_t s2 = __shfl_xor_sync(0xffffffffu, s, off);
    online_merge(m, s, m2, s2);
  }
  __shared__ acc_t sm[THREADS / 32], ss[THREADS / 32];
  if ((tid & 31) == 0) {
    sm[tid >> 5] = m;
    ss[tid >> 5] = s;
  }
  __syncthreads();
  if (tid == 0) {
    for (int w = 1; w < THREADS / 32; ++w) online_merge(m, s, sm[w], ss[w]);
    const acc_t l = m + log(s);
    const int64_t local = y - vocab_start;  // the label's column in this slice, if it is in it
    lse[r] = l;
    logp[r] = (local >= 0 && local < V) ? static_cast<acc_t>(row[local]) - l : acc_t(0);
  }
}

template <typename scalar_t, typename acc_t, int THREADS>
__global__ void __launch_bounds__(THREADS) bwd_kernel(const acc_t* __restrict__ grad, const scalar_t* logits,
                                                      RowIndexer idx, scalar_t* out, bool inplace,
                                                      const int64_t* __restrict__ labels,
                                                      const acc_t* __restrict__ lse, int64_t V,
                                                      int64_t ignore_index, int64_t vocab_start,
                                                      int64_t vocab_size) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t off = idx.offset(r);
  const scalar_t* row = logits + off;
  scalar_t* orow = inplace ? out + off : out + r * V;
  const int64_t y = labels[r];
  const bool ignored = (y == ignore_index);
  CUDA_KERNEL_ASSERT((ignored || (y >= 0 && y < vocab_size)) && "token_logprob_bwd: label outside the vocabulary");
  const int64_t local = y - vocab_start;  // the label's column in this slice (out of [0, V): not in it)
  const acc_t g = ignored ? acc_t(0) : grad[r];
  const acc_t l = ignored ? acc_t(0) : lse[r];
  // Same value for every element of an ignored row: 0 (written without reading the logits).
  auto value = [&](int64_t i, scalar_t x) -> scalar_t {
    if (ignored) return scalar_t(0);
    acc_t v = -g * exp_acc(static_cast<acc_t>(x) - l);
    if (i == local) v += g;
    return static_cast<scalar_t>(v);
  };
  // Vector loads and stores need the input and output rows to share their 16-byte alignment.
  const bool same_alignment = ((reinterpret_cast<uintptr_t>(row) ^ reinterpret_cast<uintptr_t>(orow)) & 15) == 0;
  const int64_t head = same_alignment ? head_elements(row, V) : V;
  for (int64_t i = tid; i < head; i += THREADS) orow[i] = value(i, row[i]);
  const int64_t nvec = (V - head) / VEC;
  const uint4* vin = reinterpret_cast<const uint4*>(row + head);
  uint4* vout = reinterpret_cast<uint4*>(orow + head);
  for (int64_t k = tid; k < nvec; k += THREADS) {
    uint4 raw = ignored ? uint4{0, 0, 0, 0} : vin[k];
    scalar_t vals[VEC];
    memcpy(vals, &raw, 16);
    const int64_t base = head + k * VEC;
#pragma unroll
    for (int j = 0; j < VEC; ++j) vals[j] = value(base + j, vals[j]);
    memcpy(&raw, vals, 16);
    __stcs(vout + k, raw);
  }
  for (int64_t i = head + nvec * VEC + tid; i < V; i += THREADS) orow[i] = value(i, row[i]);
}

// Calls f(std::integral_constant<int, THREADS>): wide rows get more threads; rows of a few thousand
// elements do not need them.
template <typename F>
void with_block_size(int64_t rows, int64_t V, int64_t elem_size, F&& f) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "allo token_logprob: ", rows,
              " rows exceed the CUDA grid limit of 2^31 - 1; split the batch");
  if (V * elem_size >= 16 * 1024)
    f(std::integral_constant<int, 512>{});
  else
    f(std::integral_constant<int, 128>{});
}

std::tuple<at::Tensor, at::Tensor> token_logprob_fwd_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                          int64_t ignore_index, bool /*inplace_backward*/,
                                                          int64_t vocab_start, int64_t vocab_size) {
  const int64_t rows = check_inputs(logits, labels, "token_logprob_fwd");
  const int64_t full = check_vocab_slice(vocab_start, vocab_size, logits.size(-1), "token_logprob_fwd");
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = accumulate_type(logits.scalar_type());
  auto logp = at::empty(labels.sizes(), logits.options().dtype(acc));
  auto lse = at::empty(labels.sizes(), logits.options().dtype(acc));
  if (rows == 0) return {logp, lse};
  const int64_t V = logits.size(-1);
  const RowIndexer idx = make_row_indexer(logits);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floating(logits.scalar_type(), [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    const auto* x = reinterpret_cast<const scalar_t*>(logits.const_data_ptr());
    with_block_size(rows, V, sizeof(scalar_t), [&](auto threads) {
      fwd_kernel<scalar_t, acc_t, threads.value><<<rows, threads.value, 0, stream>>>(
          x, idx, labels.const_data_ptr<int64_t>(), V, ignore_index, logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
          vocab_start, full);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {logp, lse};
}

void launch_bwd(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                int64_t ignore_index, const at::Tensor& out, bool inplace, int64_t vocab_start, int64_t vocab_size) {
  const int64_t rows = labels.numel();
  if (rows == 0) return;
  const int64_t V = logits.size(-1);
  const RowIndexer idx = make_row_indexer(logits);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_floating(logits.scalar_type(), [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    const auto* x = reinterpret_cast<const scalar_t*>(logits.const_data_ptr());
    auto* o = reinterpret_cast<scalar_t*>(out.data_ptr());
    with_block_size(rows, V, sizeof(scalar_t), [&](auto threads) {
      bwd_kernel<scalar_t, acc_t, threads.value><<<rows, threads.value, 0, stream>>>(
          grad.const_data_ptr<acc_t>(), x, idx, o, inplace, labels.const_data_ptr<int64_t>(),
          lse.const_data_ptr<acc_t>(), V, ignore_index, vocab_start, vocab_size);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor token_logprob_bwd_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                  const at::Tensor& lse, int64_t ignore_index, int64_t vocab_start,
                                  int64_t vocab_size) {
  check_inputs(logits, labels, "token_logprob_bwd");
  check_backward_inputs(grad, logits, labels, lse, "token_logprob_bwd");
  const int64_t full = check_vocab_slice(vocab_start, vocab_size, logits.size(-1), "token_logprob_bwd");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  launch_bwd(grad, logits, labels, lse, ignore_index, out, /*inplace=*/false, vocab_start, full);
  return out;
}

void token_logprob_bwd_inplace_cuda(const at::Tensor& grad, at::Tensor& logits, const at::Tensor& labels,
                                    const at::Tensor& lse, int64_t ignore_index, int64_t vocab_start,
                                    int64_t vocab_size) {
  check_inputs(logits, labels, "token_logprob_bwd_inplace");
  check_backward_inputs(grad, logits, labels, lse, "token_logprob_bwd_inplace");
  const int64_t full = check_vocab_slice(vocab_start, vocab_size, logits.size(-1), "token_logprob_bwd_inplace");
  const c10::cuda::CUDAGuard guard(logits.device());
  launch_bwd(grad, logits, labels, lse, ignore_index, logits, /*inplace=*/true, vocab_start, full);
}

}  // namespace
}  // namespace allo

TORCH_LIBRARY_IMPL(allo, CUDA, m) {
  m.impl("token_logprob_fwd", &allo::token_logprob_fwd_cuda);
  m.impl("token_logprob_bwd", &allo::token_logprob_bwd_cuda);
  m.impl("token_logprob_bwd_inplace", &allo::token_logprob_bwd_inplace_cuda);
}
