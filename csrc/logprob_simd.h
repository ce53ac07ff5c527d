// The log-prob kernels' vector loops, written once for a vector of ALLO_LANES floats and included by
// logprob.cpp once per instruction set (inside a namespace and a `#pragma GCC target` region): 16 lanes
// for AVX-512, 8 for AVX2 + FMA, 4 for the x86-64 baseline (SSE2). A 16-float vector compiled for AVX2
// (GCC's target_clones of one source, as before) lowered the selects of the maxima and clamps to
// scalar code: the AVX2 clone ran ~5x slower than torch's log_softmax. No include guard, on purpose.
//
// They use GCC/Clang vector extensions: plain scalar loops do not vectorise here (without
// -ffast-math the compiler keeps the branches of clamps and maxima).

constexpr int kLanes = ALLO_LANES;
typedef float vfloat __attribute__((vector_size(4 * ALLO_LANES)));
typedef int32_t vint __attribute__((vector_size(4 * ALLO_LANES)));
typedef uint32_t vuint __attribute__((vector_size(4 * ALLO_LANES)));
typedef uint16_t vhalfbits __attribute__((vector_size(2 * ALLO_LANES)));

__attribute__((always_inline)) inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
__attribute__((always_inline)) inline void store(float* p, const vfloat& v) { std::memcpy(p, &v, sizeof(v)); }
__attribute__((always_inline)) inline vfloat splat(float x) { return vfloat{} + x; }

// exp(x) for the arguments softmax produces (x <= 0, or slightly above from rounding); 0 below -87.
// Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6 Taylor polynomial.
__attribute__((always_inline)) inline vfloat exp_v(vfloat x) {
  const vfloat big = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vint underflow = x < -87.0f;
  vfloat xc = underflow ? splat(-87.0f) : x;
  xc = xc > 88.0f ? splat(88.0f) : xc;
  const vfloat n = (xc * 1.44269504088896341f + big) - big;
  vfloat r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  vfloat p = splat(1.3888889e-3f);
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  const vfloat y = p * (vfloat)e;
  return underflow ? splat(0.0f) : y;
}

// The block's maximum when it holds no NaN. With a NaN it may return NaN (a NaN in the last vector
// or the tail) or a value below the true maximum (a lane's NaN replaces what it held before), and
// forward_rows copes with both (see there): checking for NaNs here cost ~10% of forward's time.
float block_max(const float* x, int64_t n) {
  vfloat acc = splat(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat v = load(x + i);
    acc = acc > v ? acc : v;
  }
  float m = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < kLanes; ++j) m = m > acc[j] ? m : acc[j];
  for (; i < n; ++i) m = m > x[i] ? m : x[i];
  return m;
}

float block_sum_exp(const float* x, int64_t n, float shift) {
  vfloat acc = splat(0.0f);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc += exp_v(load(x + i) - shift);
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += exp_v(splat(x[i] - shift))[0];
  return s;
}

// out[i] = -g * exp(x[i] - lse); out may be x itself (each element is read before it is written).
void block_grad(const float* x, float* out, int64_t n, float lse, float g) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(out + i, exp_v(load(x + i) - lse) * -g);
  for (; i < n; ++i) out[i] = -g * exp_v(splat(x[i] - lse))[0];
}

void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    vhalfbits h;
    std::memcpy(&h, src + i, sizeof(h));
    const vuint bits = __builtin_convertvector(h, vuint) << 16;
    store(dst + i, (vfloat)bits);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vfloat v = load(src + i);
    const vuint u = (vuint)v;
    // round to nearest even, as c10::BFloat16 does; NaN stays a (quiet) NaN
    vuint r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    r = (v != v) ? vuint{} + 0x7FC0u : r;
    const vhalfbits h = __builtin_convertvector(r, vhalfbits);
    std::memcpy(dst + i, &h, sizeof(h));
  }
  for (; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}
