// The emulation header: CUDA's device-side names for a .cu file compiled by the host compiler
// (LLMK_EMULATED; common/device.h includes this instead of <cuda_runtime.h>). It needs no CUDA
// toolkit. Everything that must interact with other threads (barriers, shuffles, votes) goes to the
// emulator (emu/emulator.h); everything per-thread (math intrinsics, atomics) is plain C++ here.
#pragma once
#if defined(__CUDACC__)
#error "emu/cuda_emu.h is for the host compiler's emulated build only"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/errors.h"
#include "emu/emulator.h"

// -- qualifiers ---------------------------------------------------------------------------------------
// `__shared__` variables are one per OS thread, and an OS thread runs one block at a time: one
// instance per running block. They are not poisoned nor race-checked (only the vocabulary's dynamic
// shared memory is): the project's kernels keep their shared memory there (docs/emulator.md).
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __constant__
#define __shared__ static thread_local
#define __align__(n) alignas(n)

// The runtime version the GPU builds use (CUDA 13): kernels that size their parameters from it
// (32 KB of kernel parameters since 12.1) take the same path under the emulator.
#define CUDART_VERSION 13000

using dim3 = ::llmk::emu::Dim3;
using uint3 = ::llmk::emu::Index3;
constexpr int warpSize = 32;

#define threadIdx (::llmk::emu::coordinates().thread_idx)
#define blockIdx (::llmk::emu::coordinates().block_idx)
#define blockDim (::llmk::emu::coordinates().block_dim)
#define gridDim (::llmk::emu::coordinates().grid_dim)

// -- barriers and warp collectives --------------------------------------------------------------------
#define __syncthreads() ::llmk::emu::syncthreads(::llmk::emu::Site::here())
inline void __syncwarp(uint32_t mask = 0xffffffffu, ::llmk::emu::Site site = ::llmk::emu::Site::here()) {
  ::llmk::emu::syncwarp(mask, site);
}
inline uint32_t __activemask() { return ::llmk::emu::active_mask(); }
inline void __nanosleep(unsigned, ::llmk::emu::Site site = ::llmk::emu::Site::here()) {
  ::llmk::emu::yield(site);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

namespace llmk::emu::detail {

enum class ShuffleKind { index, up, down, exclusive_or };

template <typename T>
struct ShuffleIn { T value; int operand; int width; };

// The value lane `lane` reads in a shuffle: PTX shfl.sync's source lane, with the operands CUDA's
// __shfl*_sync pass (b = the lane or offset, of which only b[4:0] counts; c = ((32 - width) << 8) |
// clamp, the clamp 0 for up and 31 otherwise). A source out of range reads the lane's own value (so an
// xor whose lane mask reaches past `width` reads earlier segments but not later ones, as the CUDA
// programming guide says). A source in range but outside the mask (or exited) is undefined in PTX: it
// reads poison (0xFF bytes, NaN for floats), so a result that is used shows up.
template <typename T, ShuffleKind kind>
T shuffle(uint32_t mask, T value, int operand, int width, const char* what, Site site) {
  static_assert(std::is_trivially_copyable_v<T>, "shuffles move trivially copyable values");
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail(::llmk::detail::concat(what, " with width ", width, " (a power of two from 1 to 32)"), site);
  ShuffleIn<T> in{value, operand, width};
  T out{};
  auto combine = [](void* ctx, const void* const* ins, void* const* outs) {
    const uint32_t m = *static_cast<const uint32_t*>(ctx);
    for (int lane = 0; lane < 32; ++lane) {
      if (!outs[lane]) continue;  // outside the mask, or exited
      const auto& me = *static_cast<const ShuffleIn<T>*>(ins[lane]);
      const int b = me.operand & 31;
      const int segment_mask = (32 - me.width) & 31;
      const int clamp = kind == ShuffleKind::up ? 0 : 31;
      const int max_lane = (lane & segment_mask) | (clamp & ~segment_mask);
      const int min_lane = lane & segment_mask;
      int source = lane;
      bool in_range = true;
      if constexpr (kind == ShuffleKind::index) { source = min_lane | (b & ~segment_mask); in_range = source <= max_lane; }
      if constexpr (kind == ShuffleKind::up) { source = lane - b; in_range = source >= max_lane; }
      if constexpr (kind == ShuffleKind::down) { source = lane + b; in_range = source <= max_lane; }
      if constexpr (kind == ShuffleKind::exclusive_or) { source = lane ^ b; in_range = source <= max_lane; }
      if (!in_range) source = lane;
      if (((m >> source) & 1u) && ins[source]) *static_cast<T*>(outs[lane]) = static_cast<const ShuffleIn<T>*>(ins[source])->value;
      else std::memset(outs[lane], 0xff, sizeof(T));
    }
  };
  warp_collective(what, mask, &in, &out, combine, &mask, site);
  return out;
}

template <typename Op>
uint32_t vote(uint32_t mask, uint32_t predicate, const char* what, Site site, Op op) {
  uint32_t out = 0;
  struct Context { uint32_t mask; Op op; } ctx{mask, op};
  auto combine = [](void* c, const void* const* ins, void* const* outs) {
    const auto& context = *static_cast<Context*>(c);
    uint32_t result = context.op.initial;
    for (int lane = 0; lane < 32; ++lane)  // the lanes of the mask that arrived (not exited)
      if (ins[lane]) result = context.op(result, *static_cast<const uint32_t*>(ins[lane]), lane);
    for (int lane = 0; lane < 32; ++lane)
      if (outs[lane]) *static_cast<uint32_t*>(outs[lane]) = result;
  };
  warp_collective(what, mask, &predicate, &out, combine, &ctx, site);
  return out;
}

struct BallotOp { uint32_t initial = 0; uint32_t operator()(uint32_t r, uint32_t p, int lane) const { return r | (uint32_t(p != 0) << lane); } };
struct AddOp { uint32_t initial = 0; uint32_t operator()(uint32_t r, uint32_t v, int) const { return r + v; } };
struct AndOp { uint32_t initial = ~0u; uint32_t operator()(uint32_t r, uint32_t v, int) const { return r & v; } };
struct OrOp { uint32_t initial = 0; uint32_t operator()(uint32_t r, uint32_t v, int) const { return r | v; } };
struct XorOp { uint32_t initial = 0; uint32_t operator()(uint32_t r, uint32_t v, int) const { return r ^ v; } };
struct MinUOp { uint32_t initial = ~0u; uint32_t operator()(uint32_t r, uint32_t v, int) const { return std::min(r, v); } };
struct MaxUOp { uint32_t initial = 0; uint32_t operator()(uint32_t r, uint32_t v, int) const { return std::max(r, v); } };
struct MinSOp { uint32_t initial = 0x7fffffffu; uint32_t operator()(uint32_t r, uint32_t v, int) const { return uint32_t(std::min(int32_t(r), int32_t(v))); } };
struct MaxSOp { uint32_t initial = 0x80000000u; uint32_t operator()(uint32_t r, uint32_t v, int) const { return uint32_t(std::max(int32_t(r), int32_t(v))); } };

}  // namespace llmk::emu::detail

#define LLMK_EMU_SITE_ARG ::llmk::emu::Site site = ::llmk::emu::Site::here()

template <typename T>
T __shfl_sync(uint32_t mask, T value, int source_lane, int width = 32, LLMK_EMU_SITE_ARG) {
  using namespace ::llmk::emu::detail;
  return shuffle<T, ShuffleKind::index>(mask, value, source_lane, width, "__shfl_sync", site);
}
template <typename T>
T __shfl_up_sync(uint32_t mask, T value, unsigned delta, int width = 32, LLMK_EMU_SITE_ARG) {
  using namespace ::llmk::emu::detail;
  return shuffle<T, ShuffleKind::up>(mask, value, int(delta), width, "__shfl_up_sync", site);
}
template <typename T>
T __shfl_down_sync(uint32_t mask, T value, unsigned delta, int width = 32, LLMK_EMU_SITE_ARG) {
  using namespace ::llmk::emu::detail;
  return shuffle<T, ShuffleKind::down>(mask, value, int(delta), width, "__shfl_down_sync", site);
}
template <typename T>
T __shfl_xor_sync(uint32_t mask, T value, int lane_mask, int width = 32, LLMK_EMU_SITE_ARG) {
  using namespace ::llmk::emu::detail;
  return shuffle<T, ShuffleKind::exclusive_or>(mask, value, lane_mask, width, "__shfl_xor_sync", site);
}

inline uint32_t __ballot_sync(uint32_t mask, int predicate, LLMK_EMU_SITE_ARG) {
  return ::llmk::emu::detail::vote(mask, uint32_t(predicate != 0), "__ballot_sync", site, ::llmk::emu::detail::BallotOp{});
}
inline int __any_sync(uint32_t mask, int predicate, LLMK_EMU_SITE_ARG) {
  return ::llmk::emu::detail::vote(mask, uint32_t(predicate != 0), "__any_sync", site, ::llmk::emu::detail::OrOp{}) != 0;
}
inline int __all_sync(uint32_t mask, int predicate, LLMK_EMU_SITE_ARG) {
  return ::llmk::emu::detail::vote(mask, uint32_t(predicate != 0), "__all_sync", site, ::llmk::emu::detail::AndOp{}) != 0;
}
inline unsigned __reduce_add_sync(uint32_t mask, unsigned value, LLMK_EMU_SITE_ARG) {
  return ::llmk::emu::detail::vote(mask, value, "__reduce_add_sync", site, ::llmk::emu::detail::AddOp{});
}
inline int __reduce_add_sync(uint32_t mask, int value, LLMK_EMU_SITE_ARG) {
  return int(::llmk::emu::detail::vote(mask, uint32_t(value), "__reduce_add_sync", site, ::llmk::emu::detail::AddOp{}));
}
inline unsigned __reduce_min_sync(uint32_t mask, unsigned value, LLMK_EMU_SITE_ARG) {
  return ::llmk::emu::detail::vote(mask, value, "__reduce_min_sync", site, ::llmk::emu::detail::MinUOp{});
}
inline int __reduce_min_sync(uint32_t mask, int value, LLMK_EMU_SITE_ARG) {
  return int(::llmk::emu::detail::vote(mask, uint32_t(value), "__reduce_min_sync", site, ::llmk::emu::detail::MinSOp{}));
}
inline unsigned __reduce_max_sync(uint32_t mask, unsigned value, LLMK_EMU_SITE_ARG) {
  return ::llmk::emu::detail::vote(mask, value, "__reduce_max_sync", site, ::llmk::emu::detail::MaxUOp{});
}
inline int __reduce_max_sync(uint32_t mask, int value, LLMK_EMU_SITE_ARG) {
  return int(::llmk::emu::detail::vote(mask, uint32_t(value), "__reduce_max_sync", site, ::llmk::emu::detail::MaxSOp{}));
}
inline unsigned __reduce_and_sync(uint32_t mask, unsigned value, LLMK_EMU_SITE_ARG) {
  return ::llmk::emu::detail::vote(mask, value, "__reduce_and_sync", site, ::llmk::emu::detail::AndOp{});
}
inline unsigned __reduce_or_sync(uint32_t mask, unsigned value, LLMK_EMU_SITE_ARG) {
  return ::llmk::emu::detail::vote(mask, value, "__reduce_or_sync", site, ::llmk::emu::detail::OrOp{});
}
inline unsigned __reduce_xor_sync(uint32_t mask, unsigned value, LLMK_EMU_SITE_ARG) {
  return ::llmk::emu::detail::vote(mask, value, "__reduce_xor_sync", site, ::llmk::emu::detail::XorOp{});
}

// -- atomics: real ones, blocks run in parallel ---------------------------------------------------------
// Every atomic checks its address: inside the block's shared memory, or inside the kernel's operands.
#define LLMK_EMU_ATOMIC_CHECK(address) ::llmk::emu::atomic_access((address), sizeof(*(address)), site)

template <typename T>
T llmk_emu_atomic_update(T* address, T (*update)(T, T), T operand) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics of 4 or 8 bytes");
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits* word = reinterpret_cast<Bits*>(address);
  Bits expected = __atomic_load_n(word, __ATOMIC_RELAXED);
  for (;;) {
    T old;
    std::memcpy(&old, &expected, sizeof old);
    const T desired_value = update(old, operand);
    Bits desired;
    std::memcpy(&desired, &desired_value, sizeof desired);
    if (__atomic_compare_exchange_n(word, &expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return old;
  }
}
template <typename T>
T atomicAdd(T* address, T value, LLMK_EMU_SITE_ARG) {
  LLMK_EMU_ATOMIC_CHECK(address);
  if constexpr (std::is_integral_v<T>) return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
  else return llmk_emu_atomic_update<T>(address, [](T a, T b) { return T(a + b); }, value);
}
template <typename T> T atomicSub(T* address, T value, LLMK_EMU_SITE_ARG) {
  LLMK_EMU_ATOMIC_CHECK(address); return __atomic_fetch_sub(address, value, __ATOMIC_SEQ_CST); }
template <typename T> T atomicAnd(T* address, T value, LLMK_EMU_SITE_ARG) {
  LLMK_EMU_ATOMIC_CHECK(address); return __atomic_fetch_and(address, value, __ATOMIC_SEQ_CST); }
template <typename T> T atomicOr(T* address, T value, LLMK_EMU_SITE_ARG) {
  LLMK_EMU_ATOMIC_CHECK(address); return __atomic_fetch_or(address, value, __ATOMIC_SEQ_CST); }
template <typename T> T atomicXor(T* address, T value, LLMK_EMU_SITE_ARG) {
  LLMK_EMU_ATOMIC_CHECK(address); return __atomic_fetch_xor(address, value, __ATOMIC_SEQ_CST); }
template <typename T> T atomicExch(T* address, T value, LLMK_EMU_SITE_ARG) {
  LLMK_EMU_ATOMIC_CHECK(address);
  if constexpr (std::is_integral_v<T>) return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST);
  else return llmk_emu_atomic_update<T>(address, [](T, T b) { return b; }, value);
}
template <typename T> T atomicMax(T* address, T value, LLMK_EMU_SITE_ARG) {
  LLMK_EMU_ATOMIC_CHECK(address);
  return llmk_emu_atomic_update<T>(address, [](T a, T b) { return a < b ? b : a; }, value);
}
template <typename T> T atomicMin(T* address, T value, LLMK_EMU_SITE_ARG) {
  LLMK_EMU_ATOMIC_CHECK(address);
  return llmk_emu_atomic_update<T>(address, [](T a, T b) { return b < a ? b : a; }, value);
}
template <typename T> T atomicCAS(T* address, T compare, T value, LLMK_EMU_SITE_ARG) {
  LLMK_EMU_ATOMIC_CHECK(address);
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;  // the old value either way
}

// -- math and bit intrinsics (the host's IEEE operations; the fast approximations are exact here) -------
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __saturatef(float x) { return x != x ? 0.0f : std::min(std::max(x, 0.0f), 1.0f); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float exp2f(float x) { return std::exp2(x); }
inline float expf(float x) { return std::exp(x); }
inline float logf(float x) { return std::log(x); }
inline float log2f(float x) { return std::log2(x); }
inline float tanhf(float x) { return std::tanh(x); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float fabsf(float x) { return std::fabs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
  return (x >> 16) | (x << 16);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
template <typename T> T __ldg(const T* p) { return *p; }
using std::max;
using std::min;
