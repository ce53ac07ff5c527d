// Per-token log-probabilities of labels under logits, and their gradient: C++ CPU kernels, the
// torch custom-op schema (namespace ``allo``) and the Python module ``allo._C`` (which also carries
// masks.h's empty_masks).
//
//   allo::token_logprob_fwd(logits, labels, ignore_index, inplace_backward, vocab_start, vocab_size) -> (logp, lse)
//       logp[r] = logits[r, y_r] - logsumexp(logits[r, :]);  0 (and lse 0) where y_r == ignore_index.
//       Non-finite logits follow log_softmax + gather: a NaN or +inf anywhere in a row makes its lse and
//       logp NaN (and so its gradient); -inf entries have probability 0. Ignored rows are not read, so
//       they stay 0 with zero gradient whatever they hold (log_softmax's gradient there is NaN).
//       ``inplace_backward`` is not used by the kernels: autograd (allo/ops/logprob.py) reads it to
//       decide whether backward may overwrite the logits with their gradient.
//   allo::token_logprob_bwd(grad_logp, logits, labels, lse, ignore_index, vocab_start, vocab_size) -> grad_logits
//       grad_logits[r, :] = g_r * (onehot(y_r) - softmax(logits[r, :])), 0 on ignored rows.
//   allo::token_logprob_bwd_inplace(grad_logp, logits!, labels, lse, ignore_index, vocab_start, vocab_size) -> ()
//       the same, written into the logits' own buffer.
//
// Vocabulary slices: every op may get the logits of a slice of the vocabulary, columns
// [vocab_start, vocab_start + V) of rows over vocab_size entries (default: the whole rows), so a
// caller can go through a large vocabulary in slices (allo/ops/fused_linear.py). Labels are checked
// against the whole vocabulary; y_r counts only where it falls inside the slice: forward's lse is the
// slice's log-sum-exp and its logp is 0 for labels outside it, backward's lse is the whole row's (so
// softmax is the whole row's) and onehot(y_r) lands in the slice only when y_r is in it.
//
// Forward reads each row once: blocks of kBlock elements are converted to fp32 (bf16/fp16), their
// maximum found, and the running sum of exponentials rescaled only when the maximum grows (online
// log-sum-exp with one exp per element). Backward recomputes softmax from the saved lse, so only
// lse (4 bytes per token) is kept between the two.
//
// Vectorisation: the hot loops (logprob_simd.h) work on GCC vector extensions and are compiled three
// times, as 16-, 8- and 4-float vectors for AVX-512, AVX2 + FMA and the SSE2 baseline; the first call
// picks the best one the running CPU has (by feature, not model). The exponential is a branch-free
// polynomial (relative error about 1e-7, below fp32 rounding of the sums) because libm's expf does not
// vectorise without -ffast-math.
#include <torch/extension.h>
#include "masks.h"
#include "step_plan.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "logprob.h"

// The 16-float vector type is passed between always-inlined helpers only, so the ABI note GCC
// prints for it (vector returns differ with and without AVX-512) does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace allo {

at::ScalarType accumulate_type(at::ScalarType logits_dtype) {
  return logits_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

int64_t check_inputs(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  TORCH_CHECK(logits.dim() >= 1, op, ": logits must have at least one dimension (the vocabulary), got a scalar");
  TORCH_CHECK(logits.dim() - 1 <= kMaxLeadingDims, op, ": logits may have at most ", kMaxLeadingDims,
              " leading dimensions, got shape ", logits.sizes(), "; flatten them first");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble, op,
              ": logits must be float32, bfloat16, float16 or float64, got ", dt);
  TORCH_CHECK(logits.size(-1) >= 1, op, ": logits' last dimension (the vocabulary) is empty");
  TORCH_CHECK(logits.stride(-1) == 1 || logits.size(-1) == 1, op,
              ": logits' last dimension must be contiguous (stride 1), got strides ", logits.strides(),
              "; call .contiguous() on the logits");
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1), op, ": labels have shape ",
              labels.sizes(), " but logits have shape ", logits.sizes(), "; labels must be logits.shape[:-1]");
  TORCH_CHECK(labels.is_contiguous(), op, ": labels must be contiguous");
  TORCH_CHECK(labels.device() == logits.device(), op, ": labels are on ", labels.device(), " but logits on ",
              logits.device());
  return labels.numel();
}

void check_backward_inputs(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                           const at::Tensor& lse, const char* op) {
  const auto acc = accumulate_type(logits.scalar_type());
  TORCH_CHECK(grad.scalar_type() == acc && lse.scalar_type() == acc, op, ": grad_logp and lse must be ", acc,
              " for ", logits.scalar_type(), " logits, got ", grad.scalar_type(), " and ", lse.scalar_type());
  TORCH_CHECK(grad.sizes() == labels.sizes() && lse.sizes() == labels.sizes(), op,
              ": grad_logp ", grad.sizes(), " and lse ", lse.sizes(), " must have the labels' shape ", labels.sizes());
  TORCH_CHECK(grad.is_contiguous() && lse.is_contiguous(), op, ": grad_logp and lse must be contiguous");
  TORCH_CHECK(grad.device() == logits.device() && lse.device() == logits.device(), op,
              ": grad_logp, lse and logits must be on one device");
}

int64_t check_vocab_slice(int64_t vocab_start, int64_t vocab_size, int64_t V, const char* op) {
  const int64_t full = vocab_size < 0 ? V : vocab_size;
  TORCH_CHECK(vocab_start >= 0 && vocab_start + V <= full, op, ": the logits' ", V, " columns starting at vocab_start=",
              vocab_start, " do not fit a vocabulary of vocab_size=", full,
              "; pass the slice's first column and the full vocabulary size");
  return full;
}

RowIndexer make_row_indexer(const at::Tensor& logits) {
  RowIndexer idx{};
  idx.ndim = static_cast<int32_t>(logits.dim() - 1);
  for (int32_t d = 0; d < idx.ndim; ++d) {
    idx.sizes[d] = logits.size(d);
    idx.strides[d] = logits.stride(d);
  }
  return idx;
}

namespace {

constexpr int64_t kBlock = 2048;  // 8 KiB of fp32: converted blocks stay in L1

// The vector loops (csrc/logprob_simd.h), once per instruction set; simd() picks one for the running CPU
// at first use (ALLO_LOGPROB_SIMD=avx512|avx2|sse2 forces one, for tests and comparisons).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ALLO_SIMD_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace simd_avx512 {
#define ALLO_LANES 16
#include "logprob_simd.h"
#undef ALLO_LANES
}  // namespace simd_avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace simd_avx2 {
#define ALLO_LANES 8
#include "logprob_simd.h"
#undef ALLO_LANES
}  // namespace simd_avx2
#pragma GCC pop_options
namespace simd_sse2 {  // the x86-64 baseline every such CPU has
#define ALLO_LANES 4
#include "logprob_simd.h"
#undef ALLO_LANES
}  // namespace simd_sse2
#else
namespace simd_generic {  // other compilers and architectures: 16-float vectors, as the compiler lowers them
#define ALLO_LANES 16
#include "logprob_simd.h"
#undef ALLO_LANES
}  // namespace simd_generic
#endif

struct SimdKernels {
  const char* name;
  float (*block_max)(const float*, int64_t);
  float (*block_sum_exp)(const float*, int64_t, float);
  void (*block_grad)(const float*, float*, int64_t, float, float);
  void (*to_float)(const c10::BFloat16*, float*, int64_t);
  void (*from_float)(const float*, c10::BFloat16*, int64_t);
};
#define ALLO_SIMD_KERNELS(ns, label) \
  SimdKernels { label, ns::block_max, ns::block_sum_exp, ns::block_grad, ns::to_float, ns::from_float }

SimdKernels choose_simd() {
  const char* forced = std::getenv("ALLO_LOGPROB_SIMD");
  const std::string want = forced == nullptr || *forced == '\0' ? "auto" : forced;
#ifdef ALLO_SIMD_VARIANTS
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (want == "avx512" || (want == "auto" && avx512)) {
    TORCH_CHECK(avx512, "ALLO_LOGPROB_SIMD=avx512, but this CPU has no AVX-512; unset it or use avx2 or sse2");
    return ALLO_SIMD_KERNELS(simd_avx512, "avx512");
  }
  if (want == "avx2" || (want == "auto" && avx2)) {
    TORCH_CHECK(avx2, "ALLO_LOGPROB_SIMD=avx2, but this CPU has no AVX2 and FMA; unset it or use sse2");
    return ALLO_SIMD_KERNELS(simd_avx2, "avx2");
  }
  TORCH_CHECK(want == "auto" || want == "sse2", "ALLO_LOGPROB_SIMD=", want,
              ": expected auto, avx512, avx2 or sse2");
  return ALLO_SIMD_KERNELS(simd_sse2, "sse2");
#else
  TORCH_CHECK(want == "auto" || want == "generic", "ALLO_LOGPROB_SIMD=", want,
              ": this build has one variant of the vector loops (generic); unset it");
  return ALLO_SIMD_KERNELS(simd_generic, "generic");
#endif
}

const SimdKernels& simd() {
  static const SimdKernels kernels = choose_simd();
  return kernels;
}

inline float block_max(const float* x, int64_t n) { return simd().block_max(x, n); }
inline float block_sum_exp(const float* x, int64_t n, float shift) { return simd().block_sum_exp(x, n, shift); }
inline void block_grad(const float* x, float* out, int64_t n, float lse, float g) {
  simd().block_grad(x, out, n, lse, g);
}
inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) { simd().to_float(src, dst, n); }
inline void from_float(const float* src, c10::BFloat16* dst, int64_t n) { simd().from_float(src, dst, n); }

// fp16 logits are rare on CPUs: c10's scalar conversions are enough.
void to_float(const c10::Half* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
void from_float(const float* src, c10::Half* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// A fresh logits-sized gradient is mostly page faults on Linux (4 KiB pages: ~130 ms for 262 MB on a
// 2-core VM, against ~20 ms to compute it). Asking for transparent huge pages on the buffer before
// it is first written cuts that ~4x when THP is in "madvise" mode (torch does the same for all its
// allocations with THP_MEM_ALLOC_ENABLE=1). Only a hint: if refused, nothing changes but speed.
void advise_huge_pages(void* data, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (nbytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)nbytes;
#endif
}

inline int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 16) / vocab); }

[[noreturn]] void bad_label(const char* op, int64_t row, int64_t label, int64_t vocab, int64_t ignore_index) {
  TORCH_CHECK(false, op, ": labels[", row, "] = ", label, " is outside the vocabulary [0, ", vocab,
              ") and is not ignore_index (", ignore_index, ")");
}

// float64 logits (gradcheck, references): plain loops in double, same interface as the fp32 blocks.
double block_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = m > x[i] ? m : x[i];
  return m;
}
double block_sum_exp(const double* x, int64_t n, double shift) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}
void block_grad(const double* x, double* out, int64_t n, double lse, double g) {
  for (int64_t i = 0; i < n; ++i) out[i] = -g * std::exp(x[i] - lse);
}

template <typename acc_t>
bool has_nan(const acc_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i]) return true;
  return false;
}

// scalar_t: the logits' dtype; acc_t: float (fp32/bf16/fp16 logits) or double (fp64 logits).
// bf16/fp16 blocks are converted into a small fp32 buffer; fp32 and fp64 rows are used in place.
template <typename scalar_t, typename acc_t>
void forward_rows(const at::Tensor& logits, const int64_t* labels, int64_t ignore_index, acc_t* logp, acc_t* lse,
                  int64_t rows, int64_t vocab_start, int64_t vocab_size) {
  constexpr bool kConvert = !std::is_same<scalar_t, acc_t>::value;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t V = logits.size(-1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const RowIndexer idx = make_row_indexer(logits);
  at::parallel_for(0, rows, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kConvert ? kBlock : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = labels[r];
      if (y == ignore_index) {
        logp[r] = acc_t(0);
        lse[r] = acc_t(0);
        continue;
      }
      if (y < 0 || y >= vocab_size) bad_label("token_logprob_fwd", r, y, vocab_size, ignore_index);
      const scalar_t* row = base + idx.offset(r);
      acc_t m = kNegInf;
      acc_t s = acc_t(0);
      for (int64_t b = 0; b < V; b += kBlock) {
        const int64_t n = std::min(kBlock, V - b);
        const acc_t* xb;
        if constexpr (kConvert) {
          to_float(row + b, buf.data(), n);
          xb = buf.data();
        } else {
          xb = row + b;
        }
        // A NaN in the row makes lse and logp NaN, as log_softmax's. block_max may return it (then
        // nothing later can change the result: stop), or miss it: a missed NaN makes the block's sum
        // NaN (exp_v(NaN) is NaN), and so s for good, whenever m is not -inf; a block skipped with
        // m = -inf (all -inf so far, as block_max saw it) is looked through for one instead.
        const acc_t bm = block_max(xb, n);
        if (bm != bm) {
          m = bm;
          break;
        }
        if (bm > m) {  // the running sum was taken relative to the old maximum: rescale it
          s = (s == acc_t(0)) ? acc_t(0) : s * std::exp(m - bm);
          m = bm;
        }
        if (m != kNegInf) {
          s += block_sum_exp(xb, n, m);
        } else if (has_nan(xb, n)) {  // rare: a block of -inf and NaN only
          m = std::numeric_limits<acc_t>::quiet_NaN();
          break;
        }
      }
      const acc_t l = m + std::log(s);
      const int64_t local = y - vocab_start;  // the label's column in this slice, if it is in it
      lse[r] = l;
      logp[r] = (local >= 0 && local < V) ? static_cast<acc_t>(row[local]) - l : acc_t(0);
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_rows(const at::Tensor& logits, scalar_t* out_base, bool inplace, const acc_t* grad,
                   const int64_t* labels, const acc_t* lse, int64_t ignore_index, int64_t rows,
                   int64_t vocab_start, int64_t vocab_size) {
  constexpr bool kConvert = !std::is_same<scalar_t, acc_t>::value;
  const int64_t V = logits.size(-1);
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const RowIndexer idx = make_row_indexer(logits);
  at::parallel_for(0, rows, row_grain(V), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kConvert ? kBlock : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t off = idx.offset(r);
      const scalar_t* row = base + off;
      scalar_t* out = inplace ? out_base + off : out_base + r * V;
      const int64_t y = labels[r];
      if (y == ignore_index) {
        std::fill(out, out + V, scalar_t(0));
        continue;
      }
      if (y < 0 || y >= vocab_size) bad_label("token_logprob_bwd", r, y, vocab_size, ignore_index);
      const int64_t local = y - vocab_start;  // the label's column in this slice, if it is in it
      const bool in_slice = local >= 0 && local < V;
      const acc_t g = grad[r];
      const acc_t l = lse[r];
      // read before an in-place write
      const acc_t p_label = in_slice ? std::exp(static_cast<acc_t>(row[local]) - l) : acc_t(0);
      for (int64_t b = 0; b < V; b += kBlock) {
        const int64_t n = std::min(kBlock, V - b);
        if constexpr (kConvert) {
          to_float(row + b, buf.data(), n);
          block_grad(buf.data(), buf.data(), n, l, g);
          from_float(buf.data(), out + b, n);
        } else {
          block_grad(inplace ? out + b : row + b, out + b, n, l, g);
        }
      }
      if (in_slice) out[local] = static_cast<scalar_t>(g - g * p_label);
    }
  });
}

// ---- op entry points --------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> token_logprob_fwd_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                         int64_t ignore_index, bool /*inplace_backward*/,
                                                         int64_t vocab_start, int64_t vocab_size) {
  const int64_t rows = check_inputs(logits, labels, "token_logprob_fwd");
  const int64_t full = check_vocab_slice(vocab_start, vocab_size, logits.size(-1), "token_logprob_fwd");
  const auto acc = accumulate_type(logits.scalar_type());
  auto logp = at::empty(labels.sizes(), logits.options().dtype(acc));
  auto lse = at::empty(labels.sizes(), logits.options().dtype(acc));
  dispatch_floating(logits.scalar_type(), [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    forward_rows<scalar_t, acc_t>(logits, labels.const_data_ptr<int64_t>(), ignore_index, logp.data_ptr<acc_t>(),
                                  lse.data_ptr<acc_t>(), rows, vocab_start, full);
  });
  return {logp, lse};
}

void run_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                      const at::Tensor& lse, int64_t ignore_index, at::Tensor& out, bool inplace,
                      int64_t vocab_start, int64_t vocab_size) {
  dispatch_floating(logits.scalar_type(), [&](auto s, auto a) {
    using scalar_t = decltype(s);
    using acc_t = decltype(a);
    backward_rows<scalar_t, acc_t>(logits, reinterpret_cast<scalar_t*>(out.data_ptr()), inplace,
                                   grad.const_data_ptr<acc_t>(), labels.const_data_ptr<int64_t>(),
                                   lse.const_data_ptr<acc_t>(), ignore_index, labels.numel(), vocab_start,
                                   vocab_size);
  });
}

at::Tensor token_logprob_bwd_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& labels,
                                 const at::Tensor& lse, int64_t ignore_index, int64_t vocab_start,
                                 int64_t vocab_size) {
  check_inputs(logits, labels, "token_logprob_bwd");
  check_backward_inputs(grad, logits, labels, lse, "token_logprob_bwd");
  const int64_t full = check_vocab_slice(vocab_start, vocab_size, logits.size(-1), "token_logprob_bwd");
  auto out = at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(out.data_ptr(), out.nbytes());
  run_backward_cpu(grad, logits, labels, lse, ignore_index, out, /*inplace=*/false, vocab_start, full);
  return out;
}

void token_logprob_bwd_inplace_cpu(const at::Tensor& grad, at::Tensor& logits, const at::Tensor& labels,
                                   const at::Tensor& lse, int64_t ignore_index, int64_t vocab_start,
                                   int64_t vocab_size) {
  check_inputs(logits, labels, "token_logprob_bwd_inplace");
  check_backward_inputs(grad, logits, labels, lse, "token_logprob_bwd_inplace");
  const int64_t full = check_vocab_slice(vocab_start, vocab_size, logits.size(-1), "token_logprob_bwd_inplace");
  run_backward_cpu(grad, logits, labels, lse, ignore_index, logits, /*inplace=*/true, vocab_start, full);
}

}  // namespace

std::string logprob_simd() { return simd().name; }
}  // namespace allo

TORCH_LIBRARY(allo, m) {
  m.def("token_logprob_fwd(Tensor logits, Tensor labels, int ignore_index=-100, bool inplace_backward=False,"
        " int vocab_start=0, int vocab_size=-1) -> (Tensor logp, Tensor lse)");
  m.def("token_logprob_bwd(Tensor grad_logp, Tensor logits, Tensor labels, Tensor lse, int ignore_index=-100,"
        " int vocab_start=0, int vocab_size=-1) -> Tensor");
  m.def("token_logprob_bwd_inplace(Tensor grad_logp, Tensor(a!) logits, Tensor labels, Tensor lse,"
        " int ignore_index=-100, int vocab_start=0, int vocab_size=-1) -> ()");
}

TORCH_LIBRARY_IMPL(allo, CPU, m) {
  m.impl("token_logprob_fwd", &allo::token_logprob_fwd_cpu);
  m.impl("token_logprob_bwd", &allo::token_logprob_bwd_cpu);
  m.impl("token_logprob_bwd_inplace", &allo::token_logprob_bwd_inplace_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "allo's compiled kernels; the ops are registered as torch.ops.allo.*";
  m.def("empty_masks", &allo::empty_masks, "uninitialized contiguous bool masks of the tensors' shapes, one call",
        pybind11::arg("like"));
  m.def("logprob_simd", &allo::logprob_simd,
        "which vector loops the CPU log-prob kernels run (avx512, avx2, sse2 or generic; env ALLO_LOGPROB_SIMD)");
  m.def("plan_gradients", &allo::plan_gradients,
        "a replayed MaskedAdamW step's per-parameter checks and gradients (allo/optim/step_plan.py), one call",
        pybind11::arg("params"), pybind11::arg("states"), pybind11::arg("state_tensors"),
        pybind11::arg("weight_ptrs"), pybind11::arg("grad_dtypes"), pybind11::arg("compact_entry"),
        pybind11::arg("compact"));
#ifdef ALLO_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
