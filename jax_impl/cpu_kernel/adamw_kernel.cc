// One-pass AdamW step for float32 leaves on the CPU, as an XLA FFI custom call.
//
// It reads params, grads and both moments once and writes params and both
// moments in place (28 bytes per parameter), where XLA:CPU's own fusions make
// three passes.  The attribute "mode" picks what it writes besides the moments:
// the new params in place (0, the exact step), the optax update p_new - p (0
// where p_new == p) into a buffer of its own with the params only read (1:
// small leaves of optax's update), or nothing (2: large leaves of optax's
// update, whose new param XLA computes from the new moments in the same pass as
// apply_updates' add: 20 + 16 bytes per parameter and no buffer allocated per
// call, where mode 1 needs a fresh one, which page-faults once it is large).  Every operation is the one
// jax_impl's XLA path performs, in the same order and with the same rounding
// (explicit std::fma where that path fuses, nothing else contracted: built
// with -ffp-contract=off), so the two paths agree bit for bit, and both agree
// with torch's fused CPU kernel.
//
// One call updates many leaves (all float32 leaves with the same decay flag),
// split into chunks for XLA's intra-op thread pool.  Scalars (f32[3]): decay
// factor, -step size, sqrt of bias correction 2.  Attributes "tail_offsets" and
// "tails": per leaf, the flat positions that get torch's scalar-tail formula
// (none for torch's for-loop and foreach paths, whose ops round alike in their
// vector body and remainder: for float32 they are this formula without a tail).
//
// torch's Tensor.sqrt (its for-loop and foreach paths, float32) is MKL's
// vector sqrt, vmsSqrt(VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE), not the
// correctly rounded one (±1 ulp in 17% of inputs).  Where Python found MKL it
// hands over vmsSqrt/vmdSqrt (JaxImplSetVmlSqrt) and the attribute "vml_sqrt"
// routes the loop paths' sqrt through it, in blocks of kVmlBlock elements:
// torch's result for every element at any offset and length (measured).  The
// target jax_impl_vml_sqrt is the same sqrt for XLA's graphs (float32/float64).
//
// Subnormals: XLA's threads run with flush-to-zero and denormals-are-zero set;
// torch keeps subnormals.  Every thread clears both for its own work and
// restores its floating-point environment afterwards (KeepSubnormals).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Clears FTZ/DAZ (x86 MXCSR bits 15 and 6; the FZ bit 24 of AArch64's FPCR)
// for the lifetime of the object on this thread, then restores the caller's.
class KeepSubnormals {
 public:
#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
  KeepSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~(0x8000u | 0x0040u)); }
  ~KeepSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#elif defined(__aarch64__)
  KeepSubnormals() {
    asm volatile("mrs %0, fpcr" : "=r"(saved_));
    const uint64_t cleared = saved_ & ~(uint64_t{1} << 24);
    asm volatile("msr fpcr, %0" : : "r"(cleared));
  }
  ~KeepSubnormals() { asm volatile("msr fpcr, %0" : : "r"(saved_)); }

 private:
  uint64_t saved_;
#endif
  KeepSubnormals(const KeepSubnormals&) = delete;
  KeepSubnormals& operator=(const KeepSubnormals&) = delete;
};

constexpr int64_t kParallelMin = int64_t{1} << 17;  // fewer elements in all: one thread
constexpr int64_t kChunk = int64_t{1} << 16;        // elements per work item

// MKL's vmsSqrt/vmdSqrt (LP64: MKL_INT is int32) and the mode ATen calls them with (aten/src/ATen/cpu/vml.h).
using VmsSqrt = void (*)(int32_t n, const float* a, float* r, long long mode);
using VmdSqrt = void (*)(int32_t n, const double* a, double* r, long long mode);
constexpr long long kVmlMode = 0x2 | 0x140000 | 0x100;  // VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE
std::atomic<VmsSqrt> vms_sqrt{nullptr};
std::atomic<VmdSqrt> vmd_sqrt{nullptr};
constexpr int64_t kVmlBlock = 512;  // elements per vmsSqrt call in the step: a stack buffer, in L1

struct Options {
  float b2, coefficient2, weight, eps;  // weight: float32(1 - b1); coefficient2: float32(1 - b2)
  bool maximize, decay, lerp_small;
};

Options MakeOptions(float weight, float b2, float coefficient2, float eps, bool maximize, bool decay) {
  return Options{b2, coefficient2, weight, eps, maximize, decay, std::fabs(weight) < 0.5f};
}

// -0.0, or the NaN XLA's -min(|g|, 0) gives for a NaN gradient.
inline float NegZero(float g) {
  float a = std::fabs(g);
  return std::isnan(a) ? -a : -0.0f;
}

struct Scalars {
  float decay, step_size_neg, bias_correction2_sqrt;
};

// The new moments of one element; returns the v that goes under the sqrt (max_exp_avg_sq with amsgrad).
template <bool kTail, bool kAmsgrad, bool kMaximize, bool kLerpSmall>
inline float Moments(float g, float& m, float& v, float* vmax, const Options o) {
  if (kMaximize) g = -g;
  const float nz = NegZero(g);
  const float diff = g - m;
  m = kLerpSmall ? std::fma(o.weight, diff, m) : std::fma(o.weight - 1.0f, diff, g);
  const float cg = o.coefficient2 * g;
  if (kTail) {
    v = std::fma(o.b2, v, cg * g + nz);
  } else {
    v = std::fma(cg, g, o.b2 * v + nz);
  }
  if (!kAmsgrad) return v;
  const float old = *vmax;
  // The vector path's maximum propagates NaN; the tail keeps the old value.
  const float mx = kTail ? (old < v ? v : old) : (old != old ? old : (v != v ? v : (old < v ? v : old)));
  *vmax = mx;
  return mx;
}

// The new param from the param before its decay, the new exp_avg and sqrt(v) (nz: NegZero of the gradient).
template <bool kDecay>
inline void Param(float& p, float m, float root, float nz, const Scalars s, const Options o) {
  if (kDecay) p = p * s.decay + nz;
  const float denom = root / (s.bias_correction2_sqrt + nz) + o.eps;
  p = p + (s.step_size_neg * m) / denom;
}

template <bool kTail, bool kAmsgrad, bool kMaximize, bool kDecay, bool kLerpSmall>
inline void Element(float& p, float g, float& m, float& v, float* vmax, const Scalars s, const Options o) {
  const float v_denom = Moments<kTail, kAmsgrad, kMaximize, kLerpSmall>(g, m, v, vmax, o);
  Param<kDecay>(p, m, std::sqrt(v_denom), NegZero(kMaximize ? -g : g), s, o);
}

// What a step writes besides the moments: the new param in place of the old
// (kInPlace), the update p_new - p into out with p_in only read
// (kWriteUpdate), or nothing (kMomentsOnly: p_in unused, the param left to XLA).
enum Mode { kInPlace = 0, kWriteUpdate = 1, kMomentsOnly = 2 };

// With MKL's sqrt (the loop paths, which have no tail): per block of kVmlBlock elements, the moments and
// the sqrt's inputs, one vmsSqrt over them in place, then the params.
template <bool kAmsgrad, int kMode, bool kMaximize, bool kDecay, bool kLerpSmall>
void VmlLoop(float* __restrict p_in, float* __restrict out, const float* __restrict g, float* __restrict m,
             float* __restrict v, float* __restrict vmax, const Scalars s, const Options o, int64_t begin,
             int64_t end, VmsSqrt sqrt_block) {
  float root[kVmlBlock];
  for (int64_t b = begin; b < end; b += kVmlBlock) {
    const int64_t n = std::min(kVmlBlock, end - b);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = b + k;
      root[k] = Moments<false, kAmsgrad, kMaximize, kLerpSmall>(g[i], m[i], v[i], kAmsgrad ? vmax + i : nullptr, o);
    }
    sqrt_block(static_cast<int32_t>(n), root, root, kVmlMode);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = b + k;
      const float nz = NegZero(kMaximize ? -g[i] : g[i]);
      if (kMode == kWriteUpdate) {
        float p = p_in[i];
        Param<kDecay>(p, m[i], root[k], nz, s, o);
        out[i] = p == p_in[i] ? 0.0f : p - p_in[i];  // as Loop's
      } else {
        Param<kDecay>(p_in[i], m[i], root[k], nz, s, o);
      }
    }
  }
}

template <bool kTail, bool kAmsgrad, int kMode, bool kMaximize, bool kDecay, bool kLerpSmall>
void Loop(float* __restrict p_in, float* __restrict out, const float* __restrict g, float* __restrict m,
          float* __restrict v, float* __restrict vmax, const Scalars s, const Options o, int64_t begin,
          int64_t end, VmsSqrt sqrt_block) {
  if (!kTail && kMode != kMomentsOnly && sqrt_block != nullptr) {
    VmlLoop<kAmsgrad, kMode, kMaximize, kDecay, kLerpSmall>(p_in, out, g, m, v, vmax, s, o, begin, end,
                                                             sqrt_block);
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    if (kMode == kMomentsOnly) {
      float p = 0.0f;  // computed and dropped: the compiler removes the param's arithmetic
      Element<kTail, kAmsgrad, kMaximize, kDecay, kLerpSmall>(p, g[i], m[i], v[i], kAmsgrad ? vmax + i : nullptr,
                                                               s, o);
    } else if (kMode == kWriteUpdate) {
      float p = p_in[i];
      Element<kTail, kAmsgrad, kMaximize, kDecay, kLerpSmall>(p, g[i], m[i], v[i], kAmsgrad ? vmax + i : nullptr,
                                                               s, o);
      // jax_impl's XLA path (optax_update): p_new - p, and +0 where p_new == p (bitwise p_new - p for a
      // finite p; for an infinite one 0, not inf - inf = nan, so that apply_updates keeps it infinite).
      out[i] = p == p_in[i] ? 0.0f : p - p_in[i];
    } else {
      Element<kTail, kAmsgrad, kMaximize, kDecay, kLerpSmall>(p_in[i], g[i], m[i], v[i],
                                                               kAmsgrad ? vmax + i : nullptr, s, o);
    }
  }
}

// Instantiates the loop for the runtime flags, so each variant vectorizes without branches.
template <bool kTail, bool kAmsgrad, int kMode>
void Range(float* p, float* out, const float* g, float* m, float* v, float* vmax, const Scalars s,
           const Options o, int64_t begin, int64_t end, VmsSqrt sqrt_block = nullptr) {
#define JAX_IMPL_LOOP(a, b, c) \
  Loop<kTail, kAmsgrad, kMode, a, b, c>(p, out, g, m, v, vmax, s, o, begin, end, sqrt_block)
  const int flags = (o.maximize ? 4 : 0) | (o.decay ? 2 : 0) | (o.lerp_small ? 1 : 0);
  switch (flags) {
    case 0: JAX_IMPL_LOOP(false, false, false); break;
    case 1: JAX_IMPL_LOOP(false, false, true); break;
    case 2: JAX_IMPL_LOOP(false, true, false); break;
    case 3: JAX_IMPL_LOOP(false, true, true); break;
    case 4: JAX_IMPL_LOOP(true, false, false); break;
    case 5: JAX_IMPL_LOOP(true, false, true); break;
    case 6: JAX_IMPL_LOOP(true, true, false); break;
    default: JAX_IMPL_LOOP(true, true, true); break;
  }
#undef JAX_IMPL_LOOP
}

struct Leaf {
  float* p;    // the params: updated in place, or (kWriteUpdate) only read, or (kMomentsOnly) unused
  float* out;  // kWriteUpdate: the update p_new - p; else nullptr
  const float* g;
  float* m;
  float* v;
  float* x;  // max_exp_avg_sq, or nullptr
  int64_t n;
};

struct Item {
  int64_t leaf, begin, end;
};

template <bool kAmsgrad, int kMode>
void Step(std::vector<Leaf> leaves, const Scalars s, const Options o, const int64_t* tail_offsets,
          const int64_t* tails, ffi::ThreadPool* pool, VmsSqrt sqrt_block) {
  // The tails' inputs, before the vector pass overwrites them.
  const int64_t tail_count = tail_offsets[leaves.size()];
  std::vector<float> saved(4 * tail_count);
  for (size_t l = 0; l < leaves.size(); ++l) {
    const Leaf& leaf = leaves[l];
    for (int64_t j = tail_offsets[l]; j < tail_offsets[l + 1]; ++j) {
      const int64_t i = tails[j];
      saved[4 * j] = leaf.p[i], saved[4 * j + 1] = leaf.m[i], saved[4 * j + 2] = leaf.v[i];
      saved[4 * j + 3] = kAmsgrad ? leaf.x[i] : 0.0f;
    }
  }
  // Every leaf in chunks, taken from a shared counter by XLA's intra-op pool
  // threads and by this thread.  The caller takes chunks too, so the step
  // finishes even when no pool thread is free, and the shared state outlives
  // tasks that start after it returns.
  struct Shared {
    std::vector<Leaf> leaves;
    std::vector<Item> items;
    std::atomic<int64_t> next{0}, done{0};
  };
  auto shared = std::make_shared<Shared>();
  shared->leaves = std::move(leaves);
  for (size_t l = 0; l < shared->leaves.size(); ++l) {
    const int64_t n = shared->leaves[l].n;
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      shared->items.push_back({static_cast<int64_t>(l), begin, std::min(n, begin + kChunk)});
    }
  }
  const int64_t items = static_cast<int64_t>(shared->items.size());
  auto work = [shared, s, o, items, sqrt_block]() {
    KeepSubnormals keep;  // this thread's environment, for this work only
    for (int64_t c; (c = shared->next.fetch_add(1)) < items;) {
      const Item& item = shared->items[c];
      const Leaf& leaf = shared->leaves[item.leaf];
      Range<false, kAmsgrad, kMode>(leaf.p, leaf.out, leaf.g, leaf.m, leaf.v, leaf.x, s, o, item.begin,
                                      item.end, sqrt_block);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t elements = 0;
  for (const Leaf& leaf : shared->leaves) elements += leaf.n;
  const int64_t threads = pool != nullptr && elements >= kParallelMin ? std::max<int64_t>(1, pool->num_threads()) : 1;
  for (int64_t t = 1; t < std::min(threads, items); ++t) {
    auto task = work;  // Schedule takes ownership of a copy
    pool->Schedule(std::move(task));
  }
  work();
  while (shared->done.load(std::memory_order_acquire) < items) std::this_thread::yield();

  KeepSubnormals keep;
  for (size_t l = 0; l < shared->leaves.size(); ++l) {
    const Leaf& leaf = shared->leaves[l];
    for (int64_t j = tail_offsets[l]; j < tail_offsets[l + 1]; ++j) {
      const int64_t i = tails[j];
      if (kMode == kInPlace) leaf.p[i] = saved[4 * j];
      leaf.m[i] = saved[4 * j + 1], leaf.v[i] = saved[4 * j + 2];
      if (kAmsgrad) leaf.x[i] = saved[4 * j + 3];
      Range<true, kAmsgrad, kMode>(leaf.p, leaf.out, leaf.g, leaf.m, leaf.v, leaf.x, s, o, i, i + 1);
    }
  }
}

// Arguments: scalars, then per leaf param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq];
// results per leaf: the param (kWriteUpdate: the update; kMomentsOnly: none),
// exp_avg, exp_avg_sq[, max_exp_avg_sq], aliased to those inputs (kWriteUpdate:
// all but the update).
ffi::Error AdamWImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                     ffi::RemainingRets rets, float weight, float b2, float coefficient2, float eps, bool maximize,
                     bool decay, bool amsgrad, int32_t mode, bool vml_sqrt, ffi::Span<const int64_t> tail_offsets,
                     ffi::Span<const int64_t> tails) {
  const VmsSqrt sqrt_block = vml_sqrt ? vms_sqrt.load() : nullptr;
  if (vml_sqrt && sqrt_block == nullptr) {
    return ffi::Error::InvalidArgument("jax_impl_adamw: vml_sqrt without MKL's vmsSqrt (JaxImplSetVmlSqrt)");
  }
  if (mode != kInPlace && mode != kWriteUpdate && mode != kMomentsOnly) {
    return ffi::Error::InvalidArgument("jax_impl_adamw: unknown mode");
  }
  const size_t in_per_leaf = amsgrad ? 5 : 4;
  const size_t first = mode == kMomentsOnly ? 1 : 0;  // the first of (param, exp_avg, exp_avg_sq, max) returned
  const size_t out_per_leaf = (amsgrad ? 4 : 3) - first;
  const size_t count = args.size() / in_per_leaf;
  if (args.size() != count * in_per_leaf || rets.size() != count * out_per_leaf ||
      tail_offsets.size() != count + 1) {
    return ffi::Error::InvalidArgument("jax_impl_adamw: inconsistent numbers of buffers");
  }
  std::vector<Leaf> leaves(count);
  for (size_t l = 0; l < count; ++l) {
    float* in[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
    for (size_t k = 0; k < in_per_leaf; ++k) {
      auto buffer = args.get<ffi::Buffer<ffi::F32>>(l * in_per_leaf + k);
      if (buffer.has_error()) return buffer.error();
      in[k] = buffer->typed_data();
      if (k == 0) leaves[l].n = static_cast<int64_t>(buffer->element_count());
    }
    float* out[4] = {nullptr, nullptr, nullptr, nullptr};  // param (or update), exp_avg, exp_avg_sq, max
    for (size_t k = first; k < first + out_per_leaf; ++k) {
      auto buffer = rets.get<ffi::Buffer<ffi::F32>>(l * out_per_leaf + k - first);
      if (buffer.has_error()) return buffer.error();
      out[k] = (*buffer)->typed_data();
    }
    // Results alias the inputs (input_output_aliases); copy where XLA chose otherwise.
    const size_t source[4] = {0, 2, 3, 4};
    for (size_t k = mode == kInPlace ? 0 : 1; k < first + out_per_leaf; ++k) {
      if (out[k] != in[source[k]]) std::copy_n(in[source[k]], leaves[l].n, out[k]);
    }
    leaves[l].p = mode == kInPlace ? out[0] : in[0], leaves[l].out = mode == kWriteUpdate ? out[0] : nullptr;
    leaves[l].g = in[1], leaves[l].m = out[1], leaves[l].v = out[2];
    leaves[l].x = amsgrad ? out[3] : nullptr;
  }
  const Options o = MakeOptions(weight, b2, coefficient2, eps, maximize, decay);
  const Scalars s{scalars.typed_data()[0], scalars.typed_data()[1], scalars.typed_data()[2]};
  const int64_t* offsets = tail_offsets.begin();
#define JAX_IMPL_STEP(a, m) Step<a, m>(std::move(leaves), s, o, offsets, tails.begin(), &pool, sqrt_block)
  if (amsgrad) {
    if (mode == kInPlace) JAX_IMPL_STEP(true, kInPlace);
    else if (mode == kWriteUpdate) JAX_IMPL_STEP(true, kWriteUpdate);
    else JAX_IMPL_STEP(true, kMomentsOnly);
  } else {
    if (mode == kInPlace) JAX_IMPL_STEP(false, kInPlace);
    else if (mode == kWriteUpdate) JAX_IMPL_STEP(false, kWriteUpdate);
    else JAX_IMPL_STEP(false, kMomentsOnly);
  }
#undef JAX_IMPL_STEP
  return ffi::Error::Success();
}

// torch's CPU Tensor.sqrt for float32/float64 (MKL's, as ATen calls it), elementwise, for XLA's graphs.
ffi::Error VmlSqrtImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  const int64_t n = static_cast<int64_t>(x.element_count());
  constexpr int64_t kMax = int64_t{1} << 30;  // below MKL_INT's limit
  KeepSubnormals keep;
  if (x.element_type() == ffi::F32) {
    const VmsSqrt f = vms_sqrt.load();
    if (f == nullptr) return ffi::Error::InvalidArgument("jax_impl_vml_sqrt: MKL's vmsSqrt is not loaded");
    const float* a = static_cast<const float*>(x.untyped_data());
    float* r = static_cast<float*>(y->untyped_data());
    for (int64_t b = 0; b < n; b += kMax) f(static_cast<int32_t>(std::min(kMax, n - b)), a + b, r + b, kVmlMode);
  } else if (x.element_type() == ffi::F64) {
    const VmdSqrt f = vmd_sqrt.load();
    if (f == nullptr) return ffi::Error::InvalidArgument("jax_impl_vml_sqrt: MKL's vmdSqrt is not loaded");
    const double* a = static_cast<const double*>(x.untyped_data());
    double* r = static_cast<double*>(y->untyped_data());
    for (int64_t b = 0; b < n; b += kMax) f(static_cast<int32_t>(std::min(kMax, n - b)), a + b, r + b, kVmlMode);
  } else {
    return ffi::Error::InvalidArgument("jax_impl_vml_sqrt: float32 or float64 only");
  }
  return ffi::Error::Success();
}

}  // namespace

// Python hands over MKL's vmsSqrt and vmdSqrt (addresses from ctypes), or nullptrs to go back to std::sqrt.
extern "C" void JaxImplSetVmlSqrt(void* vms, void* vmd) {
  VmsSqrt s = nullptr;
  VmdSqrt d = nullptr;
  std::memcpy(&s, &vms, sizeof s);
  std::memcpy(&d, &vmd, sizeof d);
  vms_sqrt.store(s);
  vmd_sqrt.store(d);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxImplVmlSqrt, VmlSqrtImpl,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxImplAdamW, AdamWImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("weight")
                                  .Attr<float>("b2")
                                  .Attr<float>("coefficient2")
                                  .Attr<float>("eps")
                                  .Attr<bool>("maximize")
                                  .Attr<bool>("decay")
                                  .Attr<bool>("amsgrad")
                                  .Attr<int32_t>("mode")
                                  .Attr<bool>("vml_sqrt")
                                  .Attr<ffi::Span<const int64_t>>("tail_offsets")
                                  .Attr<ffi::Span<const int64_t>>("tails"));
